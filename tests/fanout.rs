//! Black-box: live fan-out, user events across devices and sync, against a real
//! `chatlog serve` process on 127.0.0.1.
//!
//! - A post reaches every online device of every member, unasked (`request_id` 0), in
//!   seq order, exactly once; a non-member's device gets nothing.
//! - Reading on one device pushes `ReadMarkerMoved` to the user's other device; a revoked
//!   session's connection is disconnected at once.
//! - A device that never reads is cut off while the others keep receiving everything;
//!   it then catches up with `sync` (+ history paging) with no gap and no duplicate.
//! - A device offline while 500 events are posted and the server is SIGKILLed and
//!   restarted catches up seq by seq with `sync`, then receives live pushes again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use chatlog_wire::client::{Client, ClientOptions, PushItem, PushReceiver};
use chatlog_wire::frame::{FrameDecoder, decode_message, encode_message};
use chatlog_wire::limits::FRAME_BYTES_MAX;
use chatlog_wire::proto::v1::{self, ErrorCode, event, push, user_event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pushes queued per connection on the test server: small, so a device that does not
/// read is cut off after a few posts.
const PUSH_QUEUE_LEN: &str = "16";
/// Longest wait for anything the test expects to happen.
const WAIT: Duration = Duration::from_secs(15);

#[path = "common/server.rs"]
mod server;

use server::{NO_RATE_LIMITS, Server};

/// The server with a small push queue (slow readers are cut off early) and no rate
/// limits (the load here is many users' worth).
fn start_server(dir: &Path) -> Server {
    let mut args = NO_RATE_LIMITS.to_vec();
    args.extend(["--push-queue-len", PUSH_QUEUE_LEN]);
    Server::start(dir, &args)
}

async fn client(addr: &str, token: Option<String>) -> Client {
    let options = ClientOptions {
        token,
        request_timeout: Duration::from_secs(10),
        push_queue_len_max: 100_000,
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connects")
}

/// A user: id and login token.
async fn user(addr: &str, name: &str) -> (u64, String) {
    let c = client(addr, None).await;
    let created = c
        .create_user(v1::CreateUserRequest { name: name.into() })
        .await
        .expect("user created");
    (created.user_id, created.login_token)
}

/// One logged-in device: (session id, session token, client, its pushes).
async fn device(
    addr: &str,
    user: &(u64, String),
    device_id: &str,
) -> (u64, String, Client, PushReceiver) {
    let c = client(addr, None).await;
    let pushes = c.pushes().expect("push receiver");
    let login = c
        .login(v1::LoginRequest {
            user_id: user.0,
            login_token: user.1.clone(),
            device_id: device_id.into(),
            device_name: device_id.into(),
        })
        .await
        .expect("logged in");
    (login.session_id, login.session_token, c, pushes)
}

async fn post(c: &Client, chat: u64, cmid: u64, text: String) -> u64 {
    c.send_message(v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: cmid,
        text,
        media: None,
        reply_to_seq: 0,
    })
    .await
    .expect("sent")
    .seq
}

/// What one device knows of one chat: every seq from 1 (or its start) exactly once.
#[derive(Debug, Default)]
struct ChatCopy {
    events: BTreeMap<u64, v1::Event>,
}

impl ChatCopy {
    fn last(&self) -> u64 {
        self.events.keys().next_back().copied().unwrap_or(0)
    }

    /// Takes live events: each must be the next seq (no gap, no duplicate).
    fn take_live(&mut self, events: Vec<v1::Event>) {
        for e in events {
            assert_eq!(e.seq, self.last() + 1, "live events come dense and once");
            self.events.insert(e.seq, e);
        }
    }
}

/// Receives live fan-out events of `chat` until `head` has arrived, checking each is the
/// next seq. Other pushes are ignored.
async fn receive_until(pushes: &mut PushReceiver, chat: u64, copy: &mut ChatCopy, head: u64) {
    while copy.last() < head {
        let item = tokio::time::timeout(WAIT, pushes.recv())
            .await
            .unwrap_or_else(|_| panic!("chat {chat}: stuck at seq {}", copy.last()))
            .expect("client alive");
        match item {
            PushItem::Push {
                request_id: 0,
                push: push::Kind::ChatEvents(ev),
            } => {
                assert!(ev.events.iter().all(|e| e.chat_id == chat));
                copy.take_live(ev.events);
            }
            PushItem::Push { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Catches a copy up with sync, then history while the answer is `too_long`, checking
/// every seq from `last + 1` to the head arrives exactly once and in order.
async fn catch_up(c: &Client, chat: u64, copy: &mut ChatCopy) -> u64 {
    let answer = c
        .sync(v1::SyncRequest {
            chats: vec![v1::ChatPosition {
                chat_id: chat,
                last_seq: copy.last(),
            }],
            events_per_chat_max: 0,
            after_chat_id: 0,
        })
        .await
        .expect("sync");
    let Some(diff) = answer.chats.into_iter().find(|d| d.chat_id == chat) else {
        return copy.last();
    };
    assert!(!diff.not_member);
    let head = diff.head_seq;
    copy.take_live(diff.events);
    if diff.too_long {
        while copy.last() < head {
            let page = c
                .history(v1::HistoryRequest {
                    chat_id: chat,
                    from_seq: copy.last() + 1,
                    direction: v1::Direction::Forward.into(),
                    limit: 100,
                })
                .await
                .expect("history");
            assert!(!page.events.is_empty());
            copy.take_live(page.events.into_iter().filter(|e| e.seq <= head).collect());
        }
    } else {
        assert_eq!(
            copy.last(),
            head,
            "a sync that is not too_long reaches the head"
        );
    }
    head
}

fn message_text(e: &v1::Event) -> Option<&str> {
    match &e.body {
        Some(event::Body::MessagePosted(m)) => Some(&m.text),
        _ => None,
    }
}

async fn create_group(c: &Client, title: &str, members: Vec<u64>) -> u64 {
    c.create_chat(v1::CreateChatRequest {
        kind: v1::ChatKind::Group.into(),
        title: title.into(),
        member_ids: members,
    })
    .await
    .expect("chat created")
    .chat_id
}

/// A device speaking raw frames: it handshakes with a session token, then reads nothing
/// until told to. Its receive buffer is small so the server's socket fills quickly.
struct RawDevice {
    stream: tokio::net::TcpStream,
}

impl RawDevice {
    async fn connect(addr: &str, token: &str) -> RawDevice {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("small buffer");
        let mut stream = socket
            .connect(addr.parse().expect("addr"))
            .await
            .expect("connects");
        let hello = v1::Frame {
            request_id: 1,
            body: Some(v1::frame::Body::Request(v1::Request {
                kind: Some(v1::request::Kind::Handshake(v1::Handshake {
                    protocol_version: 1,
                    client_name: "slow-device".into(),
                    session_token: token.into(),
                    no_live_pushes: false,
                })),
            })),
        };
        let mut bytes = BytesMut::new();
        encode_message(&hello, FRAME_BYTES_MAX, &mut bytes).expect("encodes");
        stream.write_all(&bytes).await.expect("handshake sent");
        let mut device = RawDevice { stream };
        let (frames, _) = device.read_frames(1).await;
        match &frames[0].body {
            Some(v1::frame::Body::Response(v1::Response {
                kind: Some(v1::response::Kind::HandshakeOk(ok)),
            })) => assert_ne!(ok.session_id, 0, "authenticated by token"),
            other => panic!("handshake answered with {other:?}"),
        }
        device
    }

    /// Reads frames until `count` arrived or the server closed; true when it closed.
    async fn read_frames(&mut self, count: usize) -> (Vec<v1::Frame>, bool) {
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while frames.len() < count {
            let Ok(read) = tokio::time::timeout(WAIT, self.stream.read(&mut buf)).await else {
                panic!(
                    "the server neither sent nor closed in time; {} frames so far",
                    frames.len()
                );
            };
            let n = match read {
                Ok(0) | Err(_) => return (frames, true),
                Ok(n) => n,
            };
            let mut input = &buf[..n];
            while let Some(payload) = decoder.decode(&mut input).expect("well-formed frames") {
                frames.push(decode_message(payload).expect("a frame"));
            }
        }
        (frames, false)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_and_user_events_reach_every_online_device_and_slow_ones_resync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path());
    let addr = server.addr.clone();

    let alice = user(&addr, "alice").await;
    let bob = user(&addr, "bob").await;
    let carol = user(&addr, "carol").await;
    let (_, _, a1, mut a1_pushes) = device(&addr, &alice, "phone").await;
    let (_, _, _a2, mut a2_pushes) = device(&addr, &alice, "laptop").await;
    let (_, _, b1, mut b1_pushes) = device(&addr, &bob, "phone").await;
    let (_, _, _c1, mut c1_pushes) = device(&addr, &carol, "phone").await;

    // Without subscribing, every online device of both members gets seq 1.. in order.
    let chat = create_group(&a1, "team", vec![bob.0]).await;
    let mut head = 0;
    for i in 1..=30u64 {
        let sender = if i % 3 == 0 { &b1 } else { &a1 };
        head = post(sender, chat, i, format!("m{i}")).await;
    }
    let mut copies = [
        ChatCopy::default(),
        ChatCopy::default(),
        ChatCopy::default(),
    ];
    for (pushes, copy) in [&mut a1_pushes, &mut a2_pushes, &mut b1_pushes]
        .into_iter()
        .zip(copies.iter_mut())
    {
        receive_until(pushes, chat, copy, head).await;
        assert_eq!(
            copy.events.keys().copied().collect::<Vec<_>>(),
            (1..=head).collect::<Vec<_>>()
        );
        assert!(matches!(
            copy.events[&1].body,
            Some(event::Body::ChatCreated(_))
        ));
    }
    // Nothing more than once: after one more post, each device's next event is it.
    head = post(&a1, chat, 1000, "marker".into()).await;
    for (pushes, copy) in [&mut a1_pushes, &mut a2_pushes, &mut b1_pushes]
        .into_iter()
        .zip(copies.iter_mut())
    {
        receive_until(pushes, chat, copy, head).await;
        assert_eq!(message_text(&copy.events[&head]), Some("marker"));
    }
    // The non-member's device got nothing at all.
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), c1_pushes.recv()).await {
        panic!("a non-member's device got {item:?}");
    }

    // Reading on the phone clears the badge on the laptop.
    a1.mark_read(v1::MarkReadRequest {
        chat_id: chat,
        seq: head,
    })
    .await
    .expect("marked");
    let moved = loop {
        let item = tokio::time::timeout(WAIT, a2_pushes.recv())
            .await
            .expect("a user event in time")
            .expect("client alive");
        if let PushItem::Push {
            request_id: 0,
            push:
                push::Kind::UserEvent(v1::UserEvent {
                    body: Some(user_event::Body::ReadMarkerMoved(m)),
                    user_id,
                    ..
                }),
        } = item
        {
            assert_eq!(user_id, alice.0);
            break m;
        }
    };
    assert_eq!(
        (moved.chat_id, moved.read_seq, moved.unread_count),
        (chat, head, 0)
    );

    // A revoked session's connection is told and closed at once.
    let (a3_session, _, _a3, mut a3_pushes) = device(&addr, &alice, "tablet").await;
    a1.revoke_session(v1::RevokeSessionRequest {
        session_id: a3_session,
    })
    .await
    .expect("revoked");
    loop {
        let item = tokio::time::timeout(WAIT, a3_pushes.recv())
            .await
            .expect("the revoked device hears in time")
            .expect("client alive");
        match item {
            PushItem::Push {
                push: push::Kind::Disconnect(d),
                ..
            } => {
                assert_eq!(
                    d.reason.expect("a reason").code(),
                    ErrorCode::Unauthenticated
                );
                break;
            }
            PushItem::ConnectionLost => panic!("closed without a Disconnect"),
            _ => {}
        }
    }

    // A device of bob's that never reads is cut off; bob's phone is unaffected.
    let (_, slow_token, slow_login, _) = device(&addr, &bob, "slow").await;
    drop(slow_login);
    let mut slow = RawDevice::connect(&addr, &slow_token).await;
    let start = head;
    // More bytes than the socket buffers between server and device hold (the server's
    // send buffer grows to tcp_wmem's maximum, 4 MiB by default): 9 MiB in 600 posts.
    let big = "x".repeat(15 * 1024);
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let a = a1.clone();
        let big = big.clone();
        writers.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..150u64 {
                let seq = post(&a, chat, 2000 + w * 1000 + i, format!("{w}.{i} {big}")).await;
                last = last.max(seq);
            }
            last
        }));
    }
    for w in writers {
        head = head.max(w.await.expect("writer"));
    }
    receive_until(&mut b1_pushes, chat, &mut copies[2], head).await;
    assert_eq!(copies[2].events.len() as u64, head);
    let (frames, closed) = slow.read_frames(usize::MAX).await;
    assert!(closed, "the server closed the slow device's connection");
    // What the slow device did get is dense from where it started.
    let mut slow_copy = ChatCopy {
        events: copies[2]
            .events
            .range(..=start)
            .map(|(s, e)| (*s, e.clone()))
            .collect(),
    };
    for frame in frames {
        if let Some(v1::frame::Body::Push(v1::Push {
            kind: Some(push::Kind::ChatEvents(ev)),
        })) = frame.body
        {
            slow_copy.take_live(ev.events);
        }
    }
    assert!(slow_copy.last() < head, "the slow device fell behind");
    // It reconnects and catches up: nothing missing, nothing twice.
    let recovered = client(&addr, Some(slow_token)).await;
    let synced_head = catch_up(&recovered, chat, &mut slow_copy).await;
    assert_eq!(synced_head, head);
    assert_eq!(
        slow_copy.events.keys().copied().collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>()
    );
    for (seq, e) in &slow_copy.events {
        assert_eq!(
            e, &copies[2].events[seq],
            "seq {seq} is the same event everywhere"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_across_500_posts_and_a_restart_syncs_exactly_the_missing_events() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path());
    let addr = server.addr.clone();

    let alice = user(&addr, "alice").await;
    let bob = user(&addr, "bob").await;
    let (_, _, a1, _) = device(&addr, &alice, "phone").await;
    let (_, bob_token, b1, mut b1_pushes) = device(&addr, &bob, "phone").await;
    let chat = create_group(&a1, "offline", vec![bob.0]).await;
    let mut head = 0;
    for i in 1..=5u64 {
        head = post(&a1, chat, i, format!("before {i}")).await;
    }
    let mut copy = ChatCopy::default();
    receive_until(&mut b1_pushes, chat, &mut copy, head).await;
    let seen = copy.last();
    drop(b1);
    drop(b1_pushes);

    // 500 posts from 5 concurrent writers while bob is away.
    let mut writers = Vec::new();
    for w in 0..5u64 {
        let a = a1.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..100u64 {
                post(&a, chat, 10_000 + w * 1000 + i, format!("away {w}.{i}")).await;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    drop(a1);
    server.kill();
    let server = start_server(dir.path());
    let addr = server.addr.clone();

    // Back online with the same session: sync, then history pages, seq by seq.
    let b2 = client(&addr, Some(bob_token)).await;
    let mut b2_pushes = b2.pushes().expect("push receiver");
    let all = b2
        .sync(v1::SyncRequest {
            chats: Vec::new(),
            events_per_chat_max: 10,
            after_chat_id: 0,
        })
        .await
        .expect("sync of all chats");
    let diff = all
        .chats
        .iter()
        .find(|d| d.chat_id == chat)
        .expect("listed");
    assert_eq!(diff.head_seq, head + 500);
    assert!(diff.too_long, "500 events do not fit in a page of 10");
    assert_eq!(diff.unread_count, 505, "bob read nothing; alice posted 505");

    let synced_head = catch_up(&b2, chat, &mut copy).await;
    assert_eq!(synced_head, head + 500);
    let away: Vec<&v1::Event> = copy.events.range(seen + 1..).map(|(_, e)| e).collect();
    assert_eq!(away.len(), 500);
    let mut texts: Vec<&str> = away.iter().filter_map(|e| message_text(e)).collect();
    texts.sort_unstable();
    let mut expected: Vec<String> = (0..5)
        .flat_map(|w| (0..100).map(move |i| format!("away {w}.{i}")))
        .collect();
    expected.sort_unstable();
    assert_eq!(texts, expected, "each post exactly once");

    // A chat already up to date has no news.
    let nothing = b2
        .sync(v1::SyncRequest {
            chats: vec![v1::ChatPosition {
                chat_id: chat,
                last_seq: synced_head,
            }],
            events_per_chat_max: 0,
            after_chat_id: 0,
        })
        .await
        .expect("sync");
    assert!(nothing.chats.is_empty());

    // The reconnected device (authenticated by token) gets live pushes again.
    let a = client(&addr, None).await;
    a.login(v1::LoginRequest {
        user_id: alice.0,
        login_token: alice.1.clone(),
        device_id: "phone".into(),
        device_name: "phone".into(),
    })
    .await
    .expect("logged in");
    let live = post(&a, chat, 99_999, "after restart".into()).await;
    receive_until(&mut b2_pushes, chat, &mut copy, live).await;
    assert_eq!(message_text(&copy.events[&live]), Some("after restart"));
}
