//! Black-box: log retention and snapshots that carry the retained log range, on three
//! real `chatlog serve` processes (`--retain-entries`, small segments).
//!
//! Covered: with a small retention, writes purge the Raft log on every replica (a read
//! from seq 1 starts at the chat's first retained seq, a `get_by_seq` below it answers
//! NOT_FOUND naming retention); a follower killed (SIGKILL) before most of the writes and
//! restarted far behind the leader's purge mark catches up from a snapshot and then
//! serves every retained event byte-exact at the same seqs as the leader; every node's
//! data directory stays bounded while writes continue; a restart of the leader after
//! the purge serves the same history again. On one node: secret messages pending for an
//! offline device keep their entries through retention purges and a SIGKILL restart,
//! and are delivered intact; `sync` and `subscribe` from below retention continue at the
//! first retained seq; `--retain-bytes` keeps at least its bytes and the same history
//! across a restart; a backup of a purged log restores the same retained history.
//!
//! Every wait has a deadline. The seed (writer order) is printed; set
//! `CHATLOG_TEST_SEED` to repeat a run.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/server.rs"]
mod server;

use std::path::Path;
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1::{self, ErrorCode};
use cluster::{Cluster, Options, full_history, retryable, send_request};

/// Longest anything that needs an election, a snapshot or a catch-up may take.
const WAIT: Duration = Duration::from_secs(90);
/// `--retain-entries` of every node.
const RETAIN_ENTRIES: u64 = 200;
/// Bytes of text per message: big enough that the written volume dwarfs what is kept.
const TEXT_BYTES: usize = 2000;
/// Writers in flight (few, so entries carry few posts each and the log has many).
const WRITERS: u64 = 8;

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 1),
    )
    .await
}

/// Sends messages `from..to` with [`WRITERS`] in flight ([`cluster::write_messages`]).
async fn write(clients: &[Client], chat: u64, from: u64, to: u64) {
    cluster::write_messages(clients, chat, (from, to), WRITERS, TEXT_BYTES, WAIT).await
}

/// Bytes of files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            total += dir_bytes(&e.path());
        } else {
            total += meta.len();
        }
    }
    total
}

/// The first event a forward read from seq 1 returns on `client`'s node, and the head.
async fn first_served(client: &Client, chat: u64) -> (u64, u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        match client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: 1,
                direction: v1::Direction::Forward.into(),
                limit: 1,
            })
            .await
        {
            Ok(page) => return (page.events.first().map_or(0, |e| e.seq), page.head_seq),
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("history: {e}"),
        }
    }
}

/// On a single node: user "ann" logged in, a client with her session and a new group
/// chat of hers titled `title`.
async fn one_user_and_chat(addr: &str, title: &str) -> (Client, String, u64) {
    let c = connect(addr, None).await;
    let (_user, token) = cluster::create_and_login(&c, "ann", "dev").await;
    let c = connect(addr, Some(token.clone())).await;
    let chat = c
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: title.into(),
            member_ids: Vec::new(),
        })
        .await
        .expect("chat")
        .chat_id;
    (c, token, chat)
}

/// Checks one node's retained history: dense seqs from the first retained one to the
/// head, each message's text the one sent with that client message id (seq - 1, the
/// chat's creation being seq 1).
fn check_retained(node: u64, events: &[v1::Event], head: u64) {
    let first = events.first().expect("something retained").seq;
    assert!(first > 1, "node {node}: history below retention is gone");
    assert_eq!(
        events.last().expect("last").seq,
        head,
        "node {node}: up to the head"
    );
    for (k, e) in events.iter().enumerate() {
        assert_eq!(e.seq, first + k as u64, "node {node}: dense");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purge_catches_up_from_a_snapshot_with_history() {
    let started = Instant::now();
    let _ = cluster::seed();
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            groups: 2,
            extra: vec![
                "--retain-entries".into(),
                RETAIN_ENTRIES.to_string(),
                "--segment-mb".into(),
                "1".into(),
            ],
            ..Options::default()
        })
    });
    let c1 = connect(&cluster.addr(1), None).await;
    let (_alice, token) = cluster::create_and_login(&c1, "alice", "dev").await;
    let a = connect(&cluster.addr(1), Some(token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "retention".into(),
            member_ids: Vec::new(),
        })
        .await
        .expect("chat created")
        .chat_id;
    let group = group_of(chat);
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    let follower = cluster.ids().find(|n| *n != leader).expect("a follower");
    let other = cluster
        .ids()
        .find(|n| *n != leader && *n != follower)
        .expect("a third node");
    eprintln!("chat {chat} in group {group}: leader {leader}, killing {follower} later");
    let clients = [
        connect(&cluster.addr(leader), Some(token.clone())).await,
        connect(&cluster.addr(other), Some(token.clone())).await,
    ];

    // A little history with everyone up, then the follower dies (SIGKILL).
    write(&clients, chat, 0, 100).await;
    cluster.kill(follower);

    // Far more than the retention while it is down: the leader purges past it.
    let phase_two = 3000;
    write(&clients, chat, 100, phase_two).await;
    let head = phase_two + 1;
    let deadline = Instant::now() + WAIT;
    let first_kept = loop {
        let (first, h) = first_served(&clients[0], chat).await;
        assert_eq!(h, head);
        if first > 1 {
            break first;
        }
        assert!(Instant::now() < deadline, "the leader never trimmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("leader serves from seq {first_kept} of {head}");

    // Below retention: a read from seq 1 starts at the first retained seq (above), and
    // asking for seq 1 by number is NOT_FOUND naming retention.
    let below = clients[0]
        .get_by_seq(v1::GetBySeqRequest {
            chat_id: chat,
            seqs: vec![1],
        })
        .await
        .expect_err("seq 1 is below retention");
    assert_eq!(below.code(), Some(ErrorCode::NotFound), "{below}");
    assert!(below.to_string().contains("retention"), "{below}");

    // Disk stays bounded while writes go on: the leader's directory after three times
    // as much more text is not much larger than now (segments are recycled).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let disk_before = dir_bytes(&cluster.dir(leader));
    let written_more = 3 * phase_two;
    write(&clients, chat, phase_two, phase_two + written_more).await;
    let head = phase_two + written_more + 1;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let disk_after = dir_bytes(&cluster.dir(leader));
    let text_more = written_more * TEXT_BYTES as u64;
    eprintln!(
        "leader data dir: {disk_before} bytes, then {disk_after} after {text_more} more bytes of text"
    );
    assert!(
        disk_after < disk_before + text_more / 2,
        "disk grows with the writes: {disk_before} -> {disk_after}"
    );

    // The follower comes back far behind the purge mark: it installs a snapshot that
    // carries the retained range, then serves the same history as the leader.
    let restarted = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(follower));
    let f = connect(&cluster.addr(follower), Some(token.clone())).await;
    cluster::wait_head(&f, follower, chat, head, WAIT).await;
    eprintln!(
        "node {follower} caught up in {:?} after its restart",
        restarted.elapsed()
    );
    let on_leader = full_history(&clients[0], chat, WAIT).await;
    let on_follower = full_history(&f, chat, WAIT).await;
    check_retained(leader, &on_leader, head);
    check_retained(follower, &on_follower, head);
    assert!(
        on_follower == on_leader,
        "the follower's retained history differs from the leader's ({} vs {} events, first {} vs {})",
        on_follower.len(),
        on_leader.len(),
        on_follower[0].seq,
        on_leader[0].seq
    );
    // Every message is the one sent with its client message id.
    for e in &on_leader {
        if let Some(v1::event::Body::MessagePosted(m)) = &e.body {
            assert!(m.text.starts_with('m'), "{e:?}");
        }
    }

    // The leader restarts after its purges (SIGKILL) and serves the same history again.
    cluster.kill(leader);
    tokio::task::block_in_place(|| cluster.restart(leader));
    let l = connect(&cluster.addr(leader), Some(token.clone())).await;
    cluster::wait_head(&l, leader, chat, head, WAIT).await;
    let again = full_history(&l, chat, WAIT).await;
    assert!(
        again == on_leader || again.first().map(|e| e.seq) > on_leader.first().map(|e| e.seq),
        "the restarted leader serves a different history"
    );
    let tail = &on_leader[on_leader.len() - again.len().min(on_leader.len())..];
    assert!(
        again.len() <= on_leader.len() && tail == &again[..],
        "the restarted node's history is the leader's retained tail"
    );
    eprintln!("test took {:?}", started.elapsed());
}

/// Logs `user` in from `device` on `addr` and publishes the device's key (kept in
/// `keys_dir`).
async fn secret_device(
    addr: &str,
    user: &(u64, String),
    device: &str,
    keys_dir: &Path,
) -> (Client, chatlog_wire::secret::DeviceKeys) {
    let client = connect(addr, None).await;
    cluster::login(
        &client,
        v1::LoginRequest {
            user_id: user.0,
            login_token: user.1.clone(),
            device_id: device.into(),
            device_name: device.into(),
        },
    )
    .await;
    let keys = chatlog_wire::secret::DeviceKeys::load_or_create(
        keys_dir.join(format!("{}-{device}.key", user.0)),
        user.0,
        device,
    )
    .expect("keys");
    client.secret_publish(&keys).await.expect("publish");
    (client, keys)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_secret_messages_outlive_retention_purges() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut flags = vec![
        "--segment-mb",
        "1",
        "--retain-entries",
        "50",
        "--http",
        "127.0.0.1:0",
    ];
    flags.extend(server::NO_RATE_LIMITS);
    let srv = server::Server::start(&data, &flags);
    wait_policy_seeded(srv.http.as_deref().expect("http")).await;
    let listen = srv.addr.clone();
    let anon = connect(&listen, None).await;
    let alice = cluster::create_user(&anon, "alice").await;
    let bob = cluster::create_user(&anon, "bob").await;
    let alice = (alice.user_id, alice.login_token);
    let bob = (bob.user_id, bob.login_token);
    let (phone, mut phone_keys) = secret_device(&listen, &alice, "phone", keys.path()).await;
    drop(secret_device(&listen, &bob, "laptop", keys.path()).await);
    let secret_chat = phone
        .secret_start(&mut phone_keys, bob.0, "laptop")
        .await
        .expect("secret chat");
    let group = group_of(secret_chat);
    let mut texts = Vec::new();
    for i in 0..3 {
        let text = format!("pending-{i}-{:016x}", rand::random::<u64>());
        phone
            .secret_send(&mut phone_keys, secret_chat, &text, 600_000, 0, now_ms())
            .await
            .expect("secret send");
        texts.push(text);
    }

    // Traffic in the same group, far beyond the retention: a user living there posts
    // one message per entry.
    let mut k = 0;
    let writer = loop {
        let u = cluster::create_user(&anon, &format!("w{k}")).await;
        k += 1;
        if group_of(u.user_id) == group {
            break (u.user_id, u.login_token);
        }
        assert!(k < 200, "no user lands in group {group}");
    };
    let wc = connect(&listen, None).await;
    cluster::login(
        &wc,
        v1::LoginRequest {
            user_id: writer.0,
            login_token: writer.1.clone(),
            device_id: "dev".into(),
            device_name: "dev".into(),
        },
    )
    .await;
    let chat = wc
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "traffic".into(),
            member_ids: Vec::new(),
        })
        .await
        .expect("chat")
        .chat_id;
    assert_eq!(
        group_of(chat),
        group,
        "the chat lives in the secret chat's group"
    );
    for i in 0..400u64 {
        wc.send_message(send_request(chat, i + 1, &format!("t{i}")))
            .await
            .expect("send");
    }
    // The state trimmed (a read from seq 1 starts later) and the retention task ran.
    let (first, head) = first_served(&wc, chat).await;
    assert_eq!(head, 401);
    assert!(first > 1, "history from seq 1 starts at {first}: trimmed");
    // A sync from position 0 and a subscription from seq 1 continue at the first
    // retained seq, densely.
    let sync = wc
        .sync(v1::SyncRequest {
            chats: vec![v1::ChatPosition {
                chat_id: chat,
                last_seq: 0,
            }],
            events_per_chat_max: 10,
            after_chat_id: 0,
        })
        .await
        .expect("sync");
    let seqs: Vec<u64> = sync.chats[0].events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (first..first + 10).collect::<Vec<_>>(),
        "sync from below retention"
    );
    assert!(sync.chats[0].too_long);
    let mut pushes = wc.pushes().expect("pushes");
    wc.subscribe(v1::SubscribeRequest {
        chat_id: chat,
        from_seq: 1,
    })
    .await
    .expect("subscribe");
    let mut pushed = Vec::new();
    while pushed.last() != Some(&head) {
        let item = tokio::time::timeout(WAIT, pushes.recv())
            .await
            .expect("pushed in time")
            .expect("client alive");
        match item {
            // Subscription pushes carry the subscribe's request id; live pushes 0.
            chatlog_wire::client::PushItem::Push {
                request_id,
                push: v1::push::Kind::ChatEvents(ev),
            } if request_id != 0 => pushed.extend(ev.events.iter().map(|e| e.seq)),
            chatlog_wire::client::PushItem::Push {
                push: v1::push::Kind::SubscriptionEnded(end),
                ..
            } => panic!("subscription ended: {end:?}"),
            _ => {}
        }
    }
    assert_eq!(
        pushed,
        (first..=head).collect::<Vec<_>>(),
        "subscription from below retention"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // SIGKILL, restart: the pending messages are still there, intact.
    srv.kill();
    let srv = server::Server::start_on(&data, &listen, &flags);
    let (laptop, mut laptop_keys) = secret_device(&srv.addr, &bob, "laptop", keys.path()).await;
    let deadline = Instant::now() + WAIT;
    let pending = loop {
        match laptop
            .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
            .await
        {
            Ok(p) => break p,
            Err(e) if Instant::now() < deadline => {
                eprintln!("pending after restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("pending after restart: {e}"),
        }
    };
    assert_eq!(pending.messages.len(), 3);
    for (m, text) in pending.messages.iter().zip(&texts) {
        let o = laptop
            .secret_receive(&mut laptop_keys, m)
            .await
            .expect("the ciphertext is still in the log");
        assert_eq!(&o.text, text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_policy_keeps_about_its_bytes_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // 400 posts of ~1 KB, one per entry; keep 50 KB: at least ~45 posts, and less than
    // 64 entries more.
    let mut flags = vec![
        "--segment-mb",
        "1",
        "--retain-bytes",
        "50000",
        "--http",
        "127.0.0.1:0",
    ];
    flags.extend(server::NO_RATE_LIMITS);
    let srv = server::Server::start(&data, &flags);
    wait_policy_seeded(srv.http.as_deref().expect("http")).await;
    let (c, token, chat) = one_user_and_chat(&srv.addr, "bytes").await;
    for i in 0..400u64 {
        c.send_message(send_request(chat, i + 1, &"y".repeat(1000)))
            .await
            .expect("send");
    }
    let (first, head) = first_served(&c, chat).await;
    assert_eq!(head, 401);
    let kept = head + 1 - first;
    eprintln!("byte policy keeps seqs {first}..={head} ({kept} events)");
    assert!(
        (40..=130).contains(&kept),
        "at least ~45 kept, less than 64 more: {kept}"
    );
    let before = full_history(&c, chat, WAIT).await;

    // SIGKILL and restart: the same history (the ledger is in the checkpoint; replay
    // from it trims at the same entries).
    let addr = srv.addr.clone();
    srv.kill();
    let srv = server::Server::start_on(&data, &addr, &flags);
    let c = connect(&srv.addr, Some(token)).await;
    let after = full_history(&c, chat, WAIT).await;
    assert!(after == before, "history after the restart differs");
}

/// Waits until every group of the single node at `http` holds a replicated retention
/// policy. The `--retain-*` flags only seed it: each group's leader proposes it about a
/// retention tick after it leads (`chatlog_raft::retention`), and posts applied before
/// that are trimmed only as later posts move the horizon, so a test that writes a fixed
/// count and then expects trimming starts writing after the seed.
async fn wait_policy_seeded(http: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let http = http.to_owned();
        let shown = tokio::task::spawn_blocking(move || {
            chatlog(&["admin", "retention", "show", "--json", "--server", &http])
        })
        .await
        .expect("show");
        let v: serde_json::Value = serde_json::from_str(shown.trim()).expect("JSON");
        let groups = v["groups"].as_array().expect("groups");
        if !groups.is_empty() && groups.iter().all(|g| !g["policy"].is_null()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the retention policy was never seeded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `chatlog ARGS`, panicking with its stderr on failure.
fn chatlog(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(args)
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .output()
        .expect("chatlog runs");
    assert!(
        out.status.success(),
        "chatlog {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_purged_log_restores_the_same_retained_history() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut flags = vec![
        "--segment-mb",
        "1",
        "--retain-entries",
        "50",
        "--http",
        "127.0.0.1:0",
    ];
    flags.extend(server::NO_RATE_LIMITS);
    let srv = server::Server::start(&data, &flags);
    let http = srv.http.clone().expect("http");
    wait_policy_seeded(&http).await;
    let (c, token, chat) = one_user_and_chat(&srv.addr, "backup").await;
    for i in 0..300u64 {
        c.send_message(send_request(chat, i + 1, &format!("b{i}")))
            .await
            .expect("send");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = full_history(&c, chat, WAIT).await;
    assert!(before[0].seq > 1, "trimmed before the backup");
    let backup = dir.path().join("backup");
    let backup_s = backup.to_str().expect("utf-8").to_string();
    let http2 = http.clone();
    tokio::task::spawn_blocking(move || {
        chatlog(&[
            "admin", "backup", "--server", &http2, "--out", &backup_s, "--json",
        ])
    })
    .await
    .expect("backup");
    srv.kill();
    let restored = dir.path().join("restored");
    chatlog(&[
        "restore",
        "--from",
        backup.to_str().expect("utf-8"),
        "--data-dir",
        restored.to_str().expect("utf-8"),
        "--json",
    ]);
    let srv = server::Server::start(&restored, &flags);
    let c = connect(&srv.addr, Some(token)).await;
    let after = full_history(&c, chat, WAIT).await;
    assert!(
        after == before,
        "the restored node serves a different history"
    );
}
