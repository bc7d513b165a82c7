//! Black-box: a client may use any node of a cluster. Four real `chatlog serve`
//! processes with three replicas per group and two groups, so node 1 hosts no replica
//! of group 1 (static placement: group 1 on nodes 2, 3, 4; group 2 on nodes 3, 4, 1).
//!
//! Users of group 1 log in on node 1, reconnect there with their session token (the
//! handshake's token is checked on a node that has their group), list their sessions,
//! create a chat with members of both groups, post, read history, get by seq, list
//! members, mark read, count unread and list chats, all through node 1. A user of group
//! 2 (hosted on node 1) reads a chat of group 1 through node 1 too, and syncs it with a
//! chat of group 2 in one request (node 1 asks a replica of group 1 for that part). Refusals come back
//! typed from the node that answered: a non-member's read is `PERMISSION_DENIED`, a
//! revoked session `UNAUTHENTICATED`. When the replica node 1 forwards to first is
//! SIGKILLed, node 1 goes on through the next. Requests bound to the connection are
//! answered by node 1 itself once the session was checked elsewhere: presence, and
//! subscriptions (to a chat of group 2, read here, and to the chat of group 1, read from
//! a replica: history, then a new post, dense and once). A group-1 user uploads a file
//! through node 1 and posts it; a group-2 member downloads it through node 1, which
//! stores no copy, before and after node 2 dies.
//!
//! Typing indicators reach the members online on every node: typed on a node with a
//! replica of the chat's group, or on node 1 (forwarded there), the node that accepts it
//! relays it to the nodes its members are online on.
//!
//! With one replica per group on three nodes, no node holds two groups: chats with
//! members of both groups, reads, syncs and unread counts still work through every node.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it.

#[path = "common/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::{Client, ClientError, PushItem, PushReceiver, UploadOptions};
use chatlog_wire::proto::v1::{self, push};
use cluster::{Cluster, Options};

/// How long a node remembers a read of media another node granted (`GRANT_TTL` in
/// `src/service/media_forward.rs`).
const GRANT_TTL: Duration = Duration::from_secs(5);

/// Longest wait for a request that the cluster should answer (elections after start).
const WAIT: Duration = Duration::from_secs(30);
/// The node without a replica of [`FAR_GROUP`].
const NODE: u64 = 1;
/// The group node 1 hosts no replica of.
const FAR_GROUP: u64 = 1;
/// The group node 1 hosts.
const NEAR_GROUP: u64 = 2;

async fn connect(cluster: &Cluster, node: u64, token: Option<String>) -> Client {
    cluster::connect_with(
        &cluster.addr(node),
        cluster::client_options(token, Duration::from_secs(10), 5),
    )
    .await
}

/// Creates users named `{prefix}{n}` through `c` until one lives in `group`: its id and
/// login token.
async fn user_in(c: &Client, prefix: &str, group: u64) -> (u64, String) {
    for n in 0.. {
        let created = cluster::create_user(c, &format!("{prefix}{n}")).await;
        if group_of(created.user_id) == group {
            return (created.user_id, created.login_token);
        }
    }
    unreachable!()
}

/// Logs `user` in on `node` from `device`: the client and the session token.
async fn device(
    cluster: &Cluster,
    node: u64,
    user: &(u64, String),
    device: &str,
) -> (Client, String) {
    let c = connect(cluster, node, None).await;
    let login = cluster::login(
        &c,
        v1::LoginRequest {
            user_id: user.0,
            login_token: user.1.clone(),
            device_id: device.into(),
            device_name: device.into(),
        },
    )
    .await;
    (c, login.session_token)
}

/// Repeats `call` while it fails with something retryable (an election), up to [`WAIT`].
async fn retried<T, F, Fut>(what: &str, call: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Creates group chats named `title` with `members` through `c` until one lives in
/// `group` (new chats go round-robin over the groups).
async fn chat_in(c: &Client, title: &str, members: Vec<u64>, group: u64) -> u64 {
    loop {
        let created = retried("create chat", || {
            c.create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: title.into(),
                member_ids: members.clone(),
            })
        })
        .await;
        if group_of(created.chat_id) == group {
            return created.chat_id;
        }
    }
}

/// Takes the events of subscription `sid` from `rx` into `got` (their seqs) until it
/// holds `through`.
async fn subscription_through(rx: &mut PushReceiver, sid: u64, through: u64, got: &mut Vec<u64>) {
    let deadline = Instant::now() + WAIT;
    while got.last().copied().unwrap_or(0) < through {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(PushItem::Push {
                request_id,
                push: push::Kind::ChatEvents(ev),
            })) if request_id == sid => got.extend(ev.events.iter().map(|e| e.seq)),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the subscriber's connection closed"),
            Err(_) => panic!("the subscription stopped at {:?}", got.last()),
        }
    }
}

/// `len` bytes of a pattern that differs with `salt` (and within every part).
fn file_bytes(len: usize, salt: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(salt) >> 7) as u8)
        .collect()
}

/// Uploads `bytes` through `c` (a file in `dir`): the media reference to send.
async fn upload(c: &Client, dir: &tempfile::TempDir, bytes: &[u8]) -> v1::MediaRef {
    let path = dir.path().join(format!("up-{}", bytes.len()));
    std::fs::write(&path, bytes).expect("write the file");
    let finished = retried("upload", || {
        c.upload_file(&path, UploadOptions::default(), |_| {})
    })
    .await;
    finished.media.expect("a finished upload's reference")
}

/// Downloads `media` through `c` (to a file in `dir` named after `label`): its bytes.
async fn download(
    c: &Client,
    dir: &tempfile::TempDir,
    media: &v1::MediaRef,
    label: &str,
) -> Vec<u8> {
    let sha: [u8; 32] = media.sha256[..].try_into().expect("a 32-byte media id");
    let path = dir.path().join(format!("down-{label}"));
    let size = retried("download", || {
        c.download_file(sha, &path, Default::default(), |_| {})
    })
    .await;
    assert_eq!(size, media.size_bytes);
    std::fs::read(&path).expect("read the download")
}

fn code(e: ClientError) -> v1::ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("expected a server error, got {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_answers_through_one_that_has_it() {
    let mut cluster =
        tokio::task::block_in_place(|| Cluster::start(Options::more_nodes_than_replicas()));
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in(&setup, "alice", FAR_GROUP).await;
    let bob = user_in(&setup, "bob", FAR_GROUP).await;
    let carol = user_in(&setup, "carol", NEAR_GROUP).await;
    let dave = user_in(&setup, "dave", NEAR_GROUP).await;

    // Alice on node 1, which cannot check her session itself.
    let (phone, token) = device(&cluster, NODE, &alice, "phone").await;
    let sessions = retried("list sessions", || {
        phone.list_sessions(v1::ListSessionsRequest {})
    })
    .await;
    assert_eq!(sessions.sessions.len(), 1);
    assert!(sessions.sessions[0].current);
    assert_eq!(sessions.sessions[0].device_id, "phone");
    // Her token works on a new connection to node 1 (checked where group 1 lives).
    let again = connect(&cluster, NODE, Some(token.clone())).await;
    let sessions_again = retried("list sessions again", || {
        again.list_sessions(v1::ListSessionsRequest {})
    })
    .await;
    assert_eq!(sessions_again.sessions, sessions.sessions);

    // A chat with members of both groups, created through node 1, living in group 1.
    let chat = chat_in(&phone, "far", vec![bob.0, carol.0], FAR_GROUP).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let sent = retried("send", || {
            phone.send_message(cluster::send_request(
                chat,
                1000 + i,
                &format!("far post {i}"),
            ))
        })
        .await;
        seqs.push(sent.seq);
    }
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "dense seqs {seqs:?}"
    );

    // Reads of the chat through node 1, by Alice (group 1) and by Carol (group 2).
    let (carol_c, _) = device(&cluster, NODE, &carol, "tablet").await;
    for (who, c) in [("alice", &phone), ("carol", &carol_c)] {
        let history = cluster::full_history(c, chat, WAIT).await;
        let posts: Vec<_> = history
            .iter()
            .filter(|e| matches!(e.body, Some(v1::event::Body::MessagePosted(_))))
            .map(|e| e.seq)
            .collect();
        assert_eq!(posts, seqs, "{who}: history through node {NODE}");
        let got = retried("get by seq", || {
            c.get_by_seq(v1::GetBySeqRequest {
                chat_id: chat,
                seqs: vec![seqs[2]],
            })
        })
        .await;
        assert_eq!(got.events.len(), 1, "{who}");
        assert_eq!(got.events[0].seq, seqs[2], "{who}");
        let members = retried("members", || {
            c.list_members(v1::ListMembersRequest {
                chat_id: chat,
                after_user_id: 0,
                limit: 10,
            })
        })
        .await;
        let mut ids: Vec<u64> = members.members.iter().map(|m| m.user_id).collect();
        ids.sort_unstable();
        let mut expected = vec![alice.0, bob.0, carol.0];
        expected.sort_unstable();
        assert_eq!(ids, expected, "{who}");
    }
    // Carol has all five posts unread, then reads up to the third.
    let unread = retried("unread", || {
        carol_c.get_unread_counts(v1::GetUnreadCountsRequest {
            chat_ids: vec![chat],
        })
    })
    .await;
    assert_eq!(unread.counts.len(), 1);
    assert_eq!(unread.counts[0].unread_count, 5);
    retried("mark read", || {
        carol_c.mark_read(v1::MarkReadRequest {
            chat_id: chat,
            seq: seqs[2],
        })
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let unread = retried("unread", || {
            carol_c.get_unread_counts(v1::GetUnreadCountsRequest {
                chat_ids: vec![chat],
            })
        })
        .await;
        if unread.counts[0].unread_count == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unread stays {:?}",
            unread.counts
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Alice's chat list (her group's replica is elsewhere) has the chat, in full.
    let list = retried("list chats", || {
        phone.list_chats(v1::ListChatsRequest {
            after_chat_id: 0,
            limit: 100,
        })
    })
    .await;
    let summary = list
        .chats
        .iter()
        .find(|c| c.chat_id == chat)
        .expect("the chat is listed");
    assert_eq!(summary.head_seq, *seqs.last().unwrap());
    assert_eq!(summary.member_count, 3);

    // Requests bound to the connection are answered by node 1 itself, once it had
    // Alice's session checked where her group is: presence (Carol is on node 1 now)...
    let presence = retried("presence", || {
        phone.get_presence(v1::GetPresenceRequest {
            user_ids: vec![carol.0, dave.0],
        })
    })
    .await;
    let online: Vec<(u64, bool)> = presence
        .presences
        .iter()
        .map(|p| (p.user_id, p.online))
        .collect();
    assert_eq!(online, vec![(carol.0, true), (dave.0, false)]);
    // ...and a subscription to a chat of group 2, which node 1 holds.
    let near = chat_in(&phone, "near", vec![carol.0], NEAR_GROUP).await;
    let subscribed = retried("subscribe", || {
        phone.subscribe(v1::SubscribeRequest {
            chat_id: near,
            from_seq: 1,
        })
    })
    .await;
    assert_eq!(subscribed.chat_id, near);
    assert!(subscribed.head_seq >= 1, "{subscribed:?}");

    // Sync through node 1 by Carol, whose group it holds, across the chat of group 1
    // (that part answered by a node holding group 1) and the chat of group 2 (here).
    let near_head = subscribed.head_seq;
    let far_head = *seqs.last().unwrap();
    let synced = retried("sync", || {
        carol_c.sync(v1::SyncRequest {
            chats: vec![
                v1::ChatPosition {
                    chat_id: chat,
                    last_seq: seqs[0],
                },
                v1::ChatPosition {
                    chat_id: near,
                    last_seq: 0,
                },
            ],
            ..Default::default()
        })
    })
    .await;
    let by_chat = |chats: &[v1::ChatDifference], id: u64| {
        chats
            .iter()
            .find(|d| d.chat_id == id)
            .cloned()
            .unwrap_or_else(|| panic!("chat {id} missing from {chats:?}"))
    };
    let seqs_of = |d: &v1::ChatDifference| d.events.iter().map(|e| e.seq).collect::<Vec<_>>();
    let far_part = by_chat(&synced.chats, chat);
    assert_eq!(
        seqs_of(&far_part),
        (seqs[0] + 1..=far_head).collect::<Vec<_>>()
    );
    assert_eq!(
        (far_part.head_seq, far_part.read_seq, far_part.unread_count),
        (far_head, seqs[2], 2)
    );
    let near_part = by_chat(&synced.chats, near);
    assert_eq!(seqs_of(&near_part), (1..=near_head).collect::<Vec<_>>());
    assert!(!far_part.too_long && !near_part.too_long);
    assert!(synced.chats.windows(2).all(|w| w[0].chat_id < w[1].chat_id));
    // Every chat of hers, each from her read marker.
    let synced = retried("sync all", || carol_c.sync(v1::SyncRequest::default())).await;
    assert_eq!(synced.chats.len(), 2, "{:?}", synced.chats);
    assert_eq!(
        seqs_of(&by_chat(&synced.chats, chat)),
        (seqs[2] + 1..=far_head).collect::<Vec<_>>()
    );
    // Alice uploads a file through node 1 (the upload goes to a replica of her group)
    // and posts it to the chat; Carol downloads it through node 1, which stores no copy
    // and holds neither the upload's record nor the chat's.
    let files = tempfile::tempdir().expect("tempdir");
    let bytes = file_bytes(700 * 1024, 1);
    let media = upload(&phone, &files, &bytes).await;
    retried("send media", || {
        phone.send_message(v1::SendMessageRequest {
            media: Some(media.clone()),
            ..cluster::send_request(chat, 1900, "a file")
        })
    })
    .await;
    assert_eq!(download(&carol_c, &files, &media, "before").await, bytes);

    // Refusals come back typed from the node that answered.
    let (dave_c, _) = device(&cluster, NODE, &dave, "laptop").await;
    let refused = dave_c
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 1,
            direction: v1::Direction::Forward.into(),
            limit: 10,
        })
        .await
        .expect_err("a non-member reads the chat");
    assert_eq!(code(refused), v1::ErrorCode::PermissionDenied);
    // A subscription to the chat of group 1 through node 1, which reads it from a
    // replica: its history from seq 1, then a new post, dense and once.
    let (tablet, _) = device(&cluster, NODE, &alice, "tablet").await;
    let mut tablet_rx = tablet.pushes().expect("pushes");
    let (sid, subscribed) = retried("subscribe", || {
        tablet.subscribe_with_id(v1::SubscribeRequest {
            chat_id: chat,
            from_seq: 1,
        })
    })
    .await;
    let mut got: Vec<u64> = Vec::new();
    subscription_through(&mut tablet_rx, sid, subscribed.head_seq, &mut got).await;
    let posted = retried("send", || {
        phone.send_message(cluster::send_request(chat, 2000, "while subscribed"))
    })
    .await;
    subscription_through(&mut tablet_rx, sid, posted.seq, &mut got).await;
    assert_eq!(got, (1..=posted.seq).collect::<Vec<_>>(), "dense and once");
    retried("unsubscribe", || {
        tablet.unsubscribe(v1::UnsubscribeRequest {
            subscription_id: sid,
        })
    })
    .await;
    // The replica node 1 forwards to first (node 2) dies: node 1 goes on through the
    // next one, for reads of the chat and for Alice's session alike.
    tokio::task::block_in_place(|| cluster.kill(2));
    let history = cluster::full_history(&carol_c, chat, WAIT).await;
    assert_eq!(history.last().map(|e| e.seq), Some(posted.seq));
    // The file was stored by every replica of group 1 as it was uploaded: node 1 gets
    // it from the next one.
    assert_eq!(download(&carol_c, &files, &media, "after").await, bytes);
    let sessions_after = retried("list sessions", || {
        phone.list_sessions(v1::ListSessionsRequest {})
    })
    .await;
    assert_eq!(
        sessions_after.sessions[0], sessions.sessions[0],
        "the phone's session, through the next replica"
    );
    // Alice revokes the phone's session from another device; the phone is refused.
    let (laptop, _) = device(&cluster, 3, &alice, "laptop").await;
    let phone_session = sessions.sessions[0].session_id;
    retried("revoke", || {
        laptop.revoke_session(v1::RevokeSessionRequest {
            session_id: phone_session,
        })
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        match again.list_sessions(v1::ListSessionsRequest {}).await {
            Err(e) if e.code() == Some(v1::ErrorCode::Unauthenticated) => break,
            Err(e) if !cluster::retryable(&e) && e.code().is_some() => {
                panic!("a revoked session is refused with {e}")
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "a revoked session still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a `typing` push of `user` in `chat` with `typing` arrives on `pushes` within
/// `within` (other pushes are skipped).
async fn typing_arrives(
    pushes: &mut PushReceiver,
    chat: u64,
    user: u64,
    typing: bool,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, pushes.recv()).await {
            Ok(Some(PushItem::Push {
                push: push::Kind::Typing(t),
                ..
            })) if t.chat_id == chat && t.user_id == user && t.typing == typing => return true,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the connection closed"),
            Err(_) => return false,
        }
    }
}

/// Sends `typing` from `from` until each of `to` saw it (online lists reach the other
/// nodes within about a second of a login), up to [`WAIT`].
async fn typing_reaches(
    from: &Client,
    who: u64,
    chat: u64,
    typing: bool,
    to: &mut [(&str, &mut PushReceiver)],
) {
    let deadline = Instant::now() + WAIT;
    let mut seen = vec![false; to.len()];
    while seen.iter().any(|s| !s) {
        assert!(
            Instant::now() < deadline,
            "typing of {who} never reached {:?}",
            to.iter()
                .zip(&seen)
                .filter(|(_, s)| !**s)
                .map(|((name, _), _)| *name)
                .collect::<Vec<_>>()
        );
        retried("typing", || {
            from.typing(v1::TypingRequest {
                chat_id: chat,
                typing,
            })
        })
        .await;
        for ((_, pushes), seen) in to.iter_mut().zip(seen.iter_mut()) {
            if !*seen {
                *seen = typing_arrives(pushes, chat, who, typing, Duration::from_millis(300)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_members_online_on_every_node() {
    let cluster =
        tokio::task::block_in_place(|| Cluster::start(Options::more_nodes_than_replicas()));
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in(&setup, "alice", FAR_GROUP).await;
    let bob = user_in(&setup, "bob", NEAR_GROUP).await;
    let carol = user_in(&setup, "carol", NEAR_GROUP).await;
    let dave = user_in(&setup, "dave", FAR_GROUP).await;
    // Alice on node 3 (a replica of the chat's group), Bob on node 1 (none), Carol on
    // node 2 (a replica of the chat's group, none of her own), Dave (no member) on node 1.
    let (alice_c, _) = device(&cluster, 3, &alice, "phone").await;
    let mut alice_rx = alice_c.pushes().expect("pushes");
    let (bob_c, _) = device(&cluster, NODE, &bob, "phone").await;
    let mut bob_rx = bob_c.pushes().expect("pushes");
    let (carol_c, _) = device(&cluster, 2, &carol, "phone").await;
    let mut carol_rx = carol_c.pushes().expect("pushes");
    let (dave_c, _) = device(&cluster, NODE, &dave, "phone").await;
    let chat = chat_in(&alice_c, "typing", vec![bob.0, carol.0], FAR_GROUP).await;

    // Typed where the chat's group is: relayed to nodes 1 and 2.
    typing_reaches(
        &alice_c,
        alice.0,
        chat,
        true,
        &mut [
            ("bob on node 1", &mut bob_rx),
            ("carol on node 2", &mut carol_rx),
        ],
    )
    .await;
    // Typed on node 1, which has no replica of the chat's group: forwarded, then pushed
    // and relayed by the node that took it.
    typing_reaches(
        &bob_c,
        bob.0,
        chat,
        false,
        &mut [
            ("alice on node 3", &mut alice_rx),
            ("carol on node 2", &mut carol_rx),
        ],
    )
    .await;
    // A non-member's typing is refused, by the node that answered.
    let refused = dave_c
        .typing(v1::TypingRequest {
            chat_id: chat,
            typing: true,
        })
        .await
        .expect_err("a non-member types");
    assert_eq!(code(refused), v1::ErrorCode::PermissionDenied);
}

/// Chats, reads, a sync, unread counts and the chat list across two groups that no node
/// holds together:
/// 3 nodes, one replica per group (group 1 on node 2, group 2 on node 3, node 1 holds
/// none). A chat is created with a member whose group is on another node; a read is
/// forwarded with the session as checked; for a sync and unread counts the node holding
/// the user's group asks the other for its part, and through node 1 the whole request
/// goes to that node first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_spans_groups_that_no_node_holds_together() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(Options::one_replica_per_group()));
    let setup = connect(&cluster, 3, None).await;
    let carol = user_in(&setup, "carol", NEAR_GROUP).await;
    let dave = user_in(&setup, "dave", FAR_GROUP).await;
    let (c3, _) = device(&cluster, 3, &carol, "phone").await;
    let far = chat_in(&c3, "far", vec![dave.0], FAR_GROUP).await;
    let near = chat_in(&c3, "near", vec![dave.0], NEAR_GROUP).await;
    // Dave posts three messages to each: Carol's unread.
    let (d2, _) = device(&cluster, 2, &dave, "phone").await;
    let mut heads = Vec::new();
    for (n, chat) in [far, near].into_iter().enumerate() {
        let mut head = 0;
        for i in 0..3 {
            let cmid = ((n as u64) << 32) | (i + 1);
            head = retried("send", || {
                d2.send_message(cluster::send_request(chat, cmid, "spread"))
            })
            .await
            .seq;
        }
        heads.push((chat, head));
    }
    // A read of the chat of group 1 through node 3, which holds Carol's group: node 2,
    // which holds the chat's, does not hold hers and takes the session as node 3
    // checked it.
    let page = retried("history", || {
        c3.history(v1::HistoryRequest {
            chat_id: far,
            from_seq: 1,
            direction: v1::Direction::Forward.into(),
            limit: 10,
        })
    })
    .await;
    let posted = page
        .events
        .iter()
        .filter(|e| matches!(e.body, Some(v1::event::Body::MessagePosted(_))))
        .count();
    assert_eq!(posted, 3, "{:?}", page.events);
    let (c1, _) = device(&cluster, 1, &carol, "laptop").await;
    for (node, c) in [(3, &c3), (1, &c1)] {
        let synced = retried("sync", || {
            c.sync(v1::SyncRequest {
                chats: heads
                    .iter()
                    .map(|(chat, _)| v1::ChatPosition {
                        chat_id: *chat,
                        last_seq: 0,
                    })
                    .collect(),
                ..Default::default()
            })
        })
        .await;
        let got: Vec<(u64, Vec<u64>)> = synced
            .chats
            .iter()
            .map(|d| (d.chat_id, d.events.iter().map(|e| e.seq).collect()))
            .collect();
        let mut want: Vec<(u64, Vec<u64>)> = heads
            .iter()
            .map(|(chat, head)| (*chat, (1..=*head).collect()))
            .collect();
        want.sort_unstable();
        assert_eq!(got, want, "sync through node {node}");
        // Unread counts the same way, listed and all: three each (Dave's posts).
        for chat_ids in [vec![far, near], vec![]] {
            let counts = retried("unread", || {
                c.get_unread_counts(v1::GetUnreadCountsRequest {
                    chat_ids: chat_ids.clone(),
                })
            })
            .await;
            let got: Vec<(u64, u64, u64)> = counts
                .counts
                .iter()
                .map(|u| (u.chat_id, u.head_seq, u.unread_count))
                .collect();
            let mut want: Vec<(u64, u64, u64)> =
                heads.iter().map(|(chat, head)| (*chat, *head, 3)).collect();
            want.sort_unstable();
            assert_eq!(got, want, "unread counts through node {node}, {chat_ids:?}");
        }
        // And her chat list, each chat in full wherever its group is.
        let list = retried("list chats", || {
            c.list_chats(v1::ListChatsRequest {
                after_chat_id: 0,
                limit: 100,
            })
        })
        .await;
        // (`chat_in` may have made other chats on its way: not these.)
        let got: Vec<(u64, String, u64, u64, u64)> = list
            .chats
            .iter()
            .filter(|s| s.chat_id == far || s.chat_id == near)
            .map(|s| {
                (
                    s.chat_id,
                    s.title.clone(),
                    s.head_seq,
                    s.unread_count,
                    s.member_count,
                )
            })
            .collect();
        let mut want: Vec<(u64, String, u64, u64, u64)> = [(far, "far"), (near, "near")]
            .into_iter()
            .zip(&heads)
            .map(|((chat, title), (_, head))| (chat, title.to_string(), *head, 3, 2))
            .collect();
        want.sort_unstable();
        assert_eq!(got, want, "chat list through node {node}");
    }
}

/// Media through nodes that hold neither the file nor the grant to read it: three nodes,
/// one replica per group, so the uploader's group (the file and its upload record) is on
/// node 2, the chat's group (the grant to its members) on node 3, and node 1 holds
/// neither. The uploader uploads and posts through node 1; a member downloads through
/// every node (node 1 asks both others, node 2 stores the file but needs node 3's grant,
/// node 3 grants but needs node 2's copy); a user who is no member is refused, and so is
/// the member once removed (through node 1 after the grant it remembers expired). A
/// member who is not the uploader sends the file on to a chat of another group (her
/// right to it is on node 3, the file on node 2), whose member then reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_is_read_through_nodes_without_its_copy_or_its_grant() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(Options::one_replica_per_group()));
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in(&setup, "alice", FAR_GROUP).await;
    let bob = user_in(&setup, "bob", FAR_GROUP).await;
    let eve = user_in(&setup, "eve", FAR_GROUP).await;
    let (a1, _) = device(&cluster, 1, &alice, "phone").await;
    let chat = chat_in(&a1, "files", vec![bob.0], NEAR_GROUP).await;
    let files = tempfile::tempdir().expect("tempdir");
    let bytes = file_bytes(1200 * 1024, 2);
    let media = upload(&a1, &files, &bytes).await;
    retried("send media", || {
        a1.send_message(v1::SendMessageRequest {
            media: Some(media.clone()),
            ..cluster::send_request(chat, 1, "a file")
        })
    })
    .await;
    for node in [1, 2, 3] {
        let (b, _) = device(&cluster, node, &bob, &format!("device{node}")).await;
        let got = download(&b, &files, &media, &format!("via{node}")).await;
        assert!(got == bytes, "bob's download through node {node} differs");
        let info = retried("media info", || {
            b.media_info(v1::MediaInfoRequest {
                sha256: media.sha256.clone(),
            })
        })
        .await;
        assert_eq!(info.media.as_ref(), Some(&media), "through node {node}");
        let (e, _) = device(&cluster, node, &eve, &format!("device{node}")).await;
        let refused = e
            .media_info(v1::MediaInfoRequest {
                sha256: media.sha256.clone(),
            })
            .await
            .expect_err("a user who is no member reads the file");
        assert_eq!(
            code(refused),
            v1::ErrorCode::PermissionDenied,
            "eve through node {node}"
        );
    }
    // Bob is removed from the chat: through node 1, which remembers the grant node 3
    // gave for a few seconds, his reads stop once it expires.
    let (b1, _) = device(&cluster, 1, &bob, "after").await;
    retried("remove bob", || {
        a1.remove_member(v1::RemoveMemberRequest {
            chat_id: chat,
            user_id: bob.0,
        })
    })
    .await;
    let removed = Instant::now();
    let deadline = removed + GRANT_TTL + Duration::from_secs(5);
    loop {
        let read = b1
            .media_info(v1::MediaInfoRequest {
                sha256: media.sha256.clone(),
            })
            .await;
        match read {
            Err(e) if e.code() == Some(v1::ErrorCode::PermissionDenied) => break,
            Ok(_) => {}
            Err(e) if cluster::retryable(&e) => {}
            Err(e) => panic!("a removed member's read: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "a removed member still reads the file {:?} after his removal",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Eve, invited to the chat, sends the file on to a chat of group 1 with Finn: her
    // right to it is node 3's grant, the file is on node 2 (where her request goes).
    // Finn may then read it, through node 1.
    let finn = user_in(&setup, "finn", FAR_GROUP).await;
    retried("invite eve", || {
        a1.invite(v1::InviteRequest {
            chat_id: chat,
            user_id: eve.0,
        })
    })
    .await;
    let (e1, _) = device(&cluster, 1, &eve, "sender").await;
    let onward = chat_in(&e1, "onward", vec![finn.0], FAR_GROUP).await;
    retried("send it on", || {
        e1.send_message(v1::SendMessageRequest {
            media: Some(media.clone()),
            ..cluster::send_request(onward, 1, "look")
        })
    })
    .await;
    let (f1, _) = device(&cluster, 1, &finn, "phone").await;
    assert!(download(&f1, &files, &media, "finn").await == bytes);
}

/// An upload through node 1 (no replica of the uploader's group) whose replica (node 2,
/// where node 1 sends it) is SIGKILLed midway: resumed through node 1 with the same
/// upload id, it goes on at the next replica, which holds the parts node 2 sent it, and
/// finishes; the file then downloads through node 1, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_through_a_node_without_its_group_survives_its_replica_dying() {
    let mut cluster =
        tokio::task::block_in_place(|| Cluster::start(Options::more_nodes_than_replicas()));
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in(&setup, "alice", FAR_GROUP).await;
    let (phone, _) = device(&cluster, NODE, &alice, "phone").await;
    let files = tempfile::tempdir().expect("tempdir");
    let bytes = file_bytes(12 * 512 * 1024 + 99, 3);
    let path = files.path().join("big");
    std::fs::write(&path, &bytes).expect("write the file");
    // One part at a time; node 2 dies once four parts are acknowledged.
    let mut upload_id = 0;
    let mut acked = 0;
    let first = phone
        .upload_file(
            &path,
            UploadOptions {
                parts_in_flight: 1,
                ..Default::default()
            },
            |p| {
                upload_id = p.upload_id;
                if p.bytes_done > 0 {
                    acked += 1;
                }
                if acked == 4 {
                    tokio::task::block_in_place(|| cluster.kill(2));
                }
            },
        )
        .await;
    assert!(
        acked >= 4,
        "node 2 died mid-upload ({acked} parts acknowledged)"
    );
    assert_ne!(upload_id, 0);
    let finished = match first {
        // The next replica took the remaining parts and the finish at once.
        Ok(done) => done,
        Err(e) => {
            eprintln!("the first attempt ended with {e}; resuming upload {upload_id:016x}");
            retried("resumed upload", || {
                phone.upload_file(
                    &path,
                    UploadOptions {
                        resume_upload_id: Some(upload_id),
                        ..Default::default()
                    },
                    |_| {},
                )
            })
            .await
        }
    };
    let media = finished.media.expect("a finished upload's reference");
    assert_eq!(media.size_bytes, bytes.len() as u64);
    assert!(download(&phone, &files, &media, "after").await == bytes);
    for n in [3, 4] {
        let stored = cluster
            .dir(n)
            .join("media")
            .join("files")
            .join(&finished.media_id);
        assert!(stored.exists(), "node {n} stores the file");
    }
}

/// A subscription on node 1 to a quiet chat of group 1 (no replica there), whose user is
/// online there with live pushes, does not read the chat again for every delivery of
/// the group's poller: while a hundred posts go to another chat of that group it looks
/// only on its once-a-second recheck, and a post to its own chat still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_subscription_looks_only_when_its_chat_may_have_news() {
    let cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            http: true,
            ..Options::more_nodes_than_replicas()
        })
    });
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in(&setup, "alice", FAR_GROUP).await;
    let carol = user_in(&setup, "carol", NEAR_GROUP).await;
    let (a3, _) = device(&cluster, 3, &alice, "phone").await;
    let quiet = chat_in(&a3, "quiet", vec![carol.0], FAR_GROUP).await;
    let busy = chat_in(&a3, "busy", vec![carol.0], FAR_GROUP).await;
    // Carol online on node 1 with live pushes (so node 1's poller of group 1 covers
    // her), subscribed to the quiet chat from its next post.
    let (phone, _) = device(&cluster, NODE, &carol, "phone").await;
    let mut rx = phone.pushes().expect("pushes");
    let (sid, subscribed) = retried("subscribe", || {
        phone.subscribe_with_id(v1::SubscribeRequest {
            chat_id: quiet,
            from_seq: 0,
        })
    })
    .await;
    // Let the poller take Carol in and deliver once.
    retried("send", || {
        a3.send_message(cluster::send_request(busy, 1, "warm-up"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    const LOOKS: &str = "chatlog_remote_subscription_looks_total";
    let before = cluster.counter(NODE, LOOKS).await;
    let started = Instant::now();
    for i in 0..100 {
        retried("send", || {
            a3.send_message(cluster::send_request(busy, 10 + i, "busy"))
        })
        .await;
    }
    let looks = cluster.counter(NODE, LOOKS).await - before;
    let rechecks = started.elapsed().as_secs() + 2;
    assert!(
        looks <= rechecks,
        "{looks} looks in {:?} while only another chat of the group had news",
        started.elapsed()
    );
    // A post to the quiet chat still reaches the subscription.
    let posted = retried("send", || {
        a3.send_message(cluster::send_request(quiet, 1, "news"))
    })
    .await;
    let mut got = Vec::new();
    subscription_through(&mut rx, sid, posted.seq, &mut got).await;
    assert_eq!(
        got,
        (subscribed.head_seq + 1..=posted.seq).collect::<Vec<_>>()
    );
    // Idle, the subscription looks once a second; after one full look that finds
    // nothing, at the chat's head without a read barrier: 3 s ask for at most that
    // look's barrier (a quorum round per look before).
    let barriers = || async {
        let mut sum = 0;
        for n in cluster.ids() {
            sum += cluster.counter(n, "chatlog_read_barriers_total").await;
        }
        sum
    };
    let (before, looks_before) = (barriers().await, cluster.counter(NODE, LOOKS).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (asked, looked) = (
        barriers().await - before,
        cluster.counter(NODE, LOOKS).await - looks_before,
    );
    assert!(
        looked >= 2,
        "the idle subscription looked {looked} times in 3 s"
    );
    assert!(
        asked <= 1,
        "{asked} read barriers in 3 s of an idle subscription ({looked} looks)"
    );
}

/// A node without a replica of a group sends that group's requests to its leader once
/// an answer named it, not to the placement's first replica (which would hand a write
/// on to the leader: two hops). Group 1's leadership is moved off node 2 (its first
/// replica) first, so the placement's order alone would pick the wrong node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_go_to_the_groups_leader() {
    let mut cluster =
        tokio::task::block_in_place(|| Cluster::start(Options::more_nodes_than_replicas()));
    let setup = connect(&cluster, 3, None).await;
    let alice = user_in(&setup, "alice", FAR_GROUP).await;
    let (phone, _) = device(&cluster, NODE, &alice, "phone").await;
    let chat = chat_in(&phone, "led", vec![], FAR_GROUP).await;

    let leader = 3;
    cluster.lead_on(FAR_GROUP, leader).await;

    let post = |n: u64| {
        let phone = phone.clone();
        async move {
            retried("send", || {
                phone.send_message(cluster::send_request(chat, n, &format!("post {n}")))
            })
            .await
        }
    };
    // Posts `posts` messages (client ids from `first`) through node 1: how many of them
    // each of `replicas` answered.
    const SERVED: &str = "chatlog_forwarded_requests_served_total";
    async fn served<F: std::future::Future>(
        cluster: &Cluster,
        replicas: &[u64],
        posts: impl Fn(u64) -> F,
        first: u64,
        count: u64,
    ) -> Vec<u64> {
        let mut before = Vec::new();
        for n in replicas {
            before.push(cluster.counter(*n, SERVED).await);
        }
        for n in first..first + count {
            posts(n).await;
        }
        let mut served = Vec::new();
        for (n, before) in replicas.iter().zip(before) {
            served.push(cluster.counter(*n, SERVED).await - before);
        }
        served
    }
    const POSTS: u64 = 20;
    // The first answer names the leader.
    post(1).await;
    let got = served(&cluster, &[2, 3, 4], &post, 100, POSTS).await;
    let (_, term) = tokio::task::block_in_place(|| cluster.leader(FAR_GROUP, 0));
    assert_eq!(
        cluster.last_leader(FAR_GROUP),
        Some(leader),
        "leadership moved during the test"
    );
    assert_eq!(
        got,
        vec![0, POSTS, 0],
        "posts forwarded by node 1 answered by nodes 2, 3, 4 (group 1's leader: node 3)"
    );

    // The leader dies: node 1's hint names a dead node. Posts go on through the next
    // replica, whose answers name the new leader, which then takes them all.
    tokio::task::block_in_place(|| cluster.kill(leader));
    post(200).await;
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(FAR_GROUP, term));
    assert_ne!(leader, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 201..204 {
        post(n).await;
    }
    let got = served(&cluster, &[2, 4], &post, 300, POSTS).await;
    let expected: Vec<u64> = [2, 4]
        .iter()
        .map(|n| if *n == leader { POSTS } else { 0 })
        .collect();
    assert_eq!(
        got, expected,
        "posts forwarded by node 1 answered by nodes 2, 4 (group 1's new leader: node {leader})"
    );
}
