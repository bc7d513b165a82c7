//! Black-box: secret chats through a real `chatlog serve` process on 127.0.0.1.
//!
//! - Two devices exchange messages both ways; the server's data directory (every file,
//!   raw bytes) never holds a plaintext, before or after compaction; a ciphertext is on
//!   disk while pending and gone after acknowledgement + `POST /admin/compact`.
//! - A message whose TTL passed is erased without any other traffic, and its bytes leave
//!   the disk after compaction.
//! - A third device of the same user (and another device of the sender) receives no push,
//!   sees an empty `secret.pending`, and may neither read nor acknowledge.
//! - Tampered, replayed and misrouted ciphertexts relayed by the server are refused by
//!   the client library.
//! - Pending messages survive a SIGKILL of the server and are delivered after restart.
//! - Re-keying after `REKEY_MESSAGES` messages works end to end.
//! - On three nodes, every replica holds the ciphertext while pending and erases its own
//!   copy from disk after the acknowledgement.
//! - The CLI: `secret start`, `send`, `tail`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatlog::http::client::request;
use chatlog_raft::chat::group_of;
use chatlog_wire::client::{
    Client, ClientError, ClientOptions, PushItem, PushReceiver, SecretFlowError,
};
use chatlog_wire::proto::v1::{self, push};
use chatlog_wire::secret::{DeviceKeys, Opened, REKEY_MESSAGES, SecretError};
use disk::{compact, disk_contains};
use serde_json::Value;

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/disk.rs"]
mod disk;
#[path = "common/server.rs"]
mod server;
#[path = "common/webhook.rs"]
mod webhook;

const WAIT: Duration = Duration::from_secs(20);

/// A `chatlog serve` of these tests (`tests/common/server.rs`) with its addresses.
struct Server {
    inner: server::Server,
    clients: String,
    http: String,
}

impl Server {
    /// `chatlog serve` on `listen` (port 0 for any) with 1 MiB segments and no rate limits.
    fn start(dir: &Path, listen: &str) -> Server {
        Server::start_with(dir, listen, &[])
    }

    /// The same with more flags.
    fn start_with(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut flags = vec!["--http", "127.0.0.1:0", "--segment-mb", "1"];
        flags.extend(server::NO_RATE_LIMITS);
        flags.extend(extra);
        let inner = server::Server::start_on(dir, listen, &flags);
        Server {
            clients: inner.addr.clone(),
            http: inner.http.clone().expect("started with --http"),
            inner,
        }
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(self) {
        self.inner.kill();
    }

    async fn compact(&self) -> Value {
        compact(&self.http).await
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// A unique marker for a plaintext, so a match on disk can only be this test's.
fn marker(what: &str) -> String {
    format!("PLAINTEXT-{what}-{:016x}", rand::random::<u64>())
}

/// A logged-in device: its client, pushes, and keys in `keys_dir`.
struct Device {
    client: Client,
    pushes: PushReceiver,
    keys: DeviceKeys,
}

struct Users {
    /// `(user id, login token)` by name.
    alice: (u64, String),
    bob: (u64, String),
}

async fn anonymous(addr: &str) -> Client {
    Client::connect(addr, ClientOptions::default())
        .await
        .expect("connects")
}

async fn create_user(c: &Client, name: &str) -> (u64, String) {
    let r = cluster::create_user(c, name).await;
    (r.user_id, r.login_token)
}

async fn users(addr: &str) -> Users {
    let c = anonymous(addr).await;
    Users {
        alice: create_user(&c, "alice").await,
        bob: create_user(&c, "bob").await,
    }
}

/// Logs `user` in from `device`, opens its key file in `keys_dir` and publishes the key.
async fn device(addr: &str, user: &(u64, String), device: &str, keys_dir: &Path) -> Device {
    let client = anonymous(addr).await;
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
    let pushes = client.pushes().expect("pushes");
    let keys = DeviceKeys::load_or_create(
        keys_dir.join(format!("{}-{device}.key", user.0)),
        user.0,
        device,
    )
    .expect("keys");
    client.secret_publish(&keys).await.expect("publish");
    Device {
        client,
        pushes,
        keys,
    }
}

/// Sends `text` from `from` in `chat` (60 s to live), takes the push on `to` and opens
/// it there: the message as pushed and as opened.
async fn send_and_open(
    from: &mut Device,
    to: &mut Device,
    chat: u64,
    text: &str,
    self_destruct_s: u32,
) -> (v1::SecretMessage, Opened) {
    from.client
        .secret_send(
            &mut from.keys,
            chat,
            text,
            60_000,
            self_destruct_s,
            now_ms(),
        )
        .await
        .expect("send");
    let m = next_secret(to).await;
    let opened = to
        .client
        .secret_receive(&mut to.keys, &m)
        .await
        .expect("the target opens it");
    assert_eq!(opened.text, text);
    (m, opened)
}

/// The next secret message pushed to `d`, skipping other pushes.
async fn next_secret(d: &mut Device) -> v1::SecretMessage {
    tokio::time::timeout(WAIT, async {
        loop {
            match d.pushes.recv().await.expect("connection open") {
                PushItem::Push {
                    push: push::Kind::SecretMessage(m),
                    ..
                } => return m,
                PushItem::Lagged { dropped } => panic!("lagged by {dropped}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a secret message is pushed in time")
}

/// Asserts that no secret message is pushed to `d` (after the messages that were pushed
/// to their target were seen: a push to the wrong device would have come with them).
async fn no_secret_pushed(d: &mut Device) {
    let deadline = Instant::now() + Duration::from_millis(300);
    while let Ok(item) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        d.pushes.recv(),
    )
    .await
    {
        if let Some(PushItem::Push {
            push: push::Kind::SecretMessage(m),
            ..
        }) = item
        {
            panic!("a secret message reached the wrong device: {m:?}");
        }
    }
}

fn server_code(e: ClientError) -> v1::ErrorCode {
    match e {
        ClientError::Server { code, .. } => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_exchange_and_nothing_readable_stays_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let u = users(&server.clients).await;
    let mut phone = device(&server.clients, &u.alice, "phone", keys.path()).await;
    let mut desktop = device(&server.clients, &u.alice, "desktop", keys.path()).await;
    let mut laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
    let mut tablet = device(&server.clients, &u.bob, "tablet", keys.path()).await;

    let chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .expect("start");

    // Alice → Bob, three messages; Bob → Alice, two. Each arrives as a push to its one
    // target device and opens there.
    let mut plaintexts = Vec::new();
    let mut to_bob = Vec::new();
    for i in 0..3 {
        let text = marker(&format!("a2b-{i}"));
        let (m, opened) = send_and_open(&mut phone, &mut laptop, chat, &text, 0).await;
        assert_eq!((opened.sender_user, opened.counter), (u.alice.0, i + 1));
        plaintexts.push(text);
        to_bob.push(m);
    }
    let mut to_alice = Vec::new();
    for i in 0..2 {
        let text = marker(&format!("b2a-{i}"));
        let (m, opened) = send_and_open(&mut laptop, &mut phone, chat, &text, 30).await;
        assert_eq!(opened.self_destruct_s, 30);
        plaintexts.push(text);
        to_alice.push(m);
    }

    // The other devices of both users got nothing, see nothing and may do nothing.
    no_secret_pushed(&mut tablet).await;
    no_secret_pushed(&mut desktop).await;
    for d in [&tablet, &desktop] {
        let all = d
            .client
            .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
            .await
            .expect("pending");
        assert!(all.messages.is_empty(), "{:?}", all.messages);
        let one = d
            .client
            .secret_pending(v1::SecretPendingRequest {
                secret_chat_id: chat,
            })
            .await
            .expect_err("another device reads the chat");
        assert_eq!(server_code(one), v1::ErrorCode::PermissionDenied);
        let ack = d
            .client
            .secret_ack(v1::SecretAckRequest {
                secret_chat_id: chat,
                counter: u64::MAX,
            })
            .await
            .expect_err("another device acknowledges");
        assert_eq!(server_code(ack), v1::ErrorCode::PermissionDenied);
        let list = d
            .client
            .secret_list(v1::SecretListRequest {})
            .await
            .expect("list");
        assert!(list.chats.is_empty());
    }
    // And the tablet cannot open what it might capture.
    assert!(matches!(
        tablet.keys.open(&to_bob[0]),
        Err(SecretError::UnknownChat(_))
    ));

    // Still pending (nothing acknowledged): the ciphertexts are on disk, the plaintexts
    // never are.
    for m in to_bob.iter().chain(&to_alice) {
        assert!(
            disk_contains(&data, &m.ciphertext).is_some(),
            "a pending ciphertext is not in the data directory: the scan would prove nothing"
        );
    }
    for p in &plaintexts {
        assert_eq!(
            disk_contains(&data, p.as_bytes()),
            None,
            "plaintext on disk"
        );
    }
    let pending = laptop
        .client
        .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
        .await
        .expect("pending");
    assert_eq!(pending.messages.len(), 3);
    assert_eq!(pending.messages[2].ciphertext, to_bob[2].ciphertext);

    // Acknowledged: erased from the state, zeroed in the log, gone after compaction.
    let erased = laptop
        .client
        .secret_ack(v1::SecretAckRequest {
            secret_chat_id: chat,
            counter: 3,
        })
        .await
        .expect("ack");
    assert_eq!(erased.erased, 3);
    let erased = phone
        .client
        .secret_ack(v1::SecretAckRequest {
            secret_chat_id: chat,
            counter: 2,
        })
        .await
        .expect("ack");
    assert_eq!(erased.erased, 2);
    let report = server.compact().await;
    assert!(
        report["segments_rewritten"].as_u64().unwrap() > 0,
        "{report}"
    );
    for m in to_bob.iter().chain(&to_alice) {
        assert_eq!(
            disk_contains(&data, &m.ciphertext),
            None,
            "an acknowledged ciphertext survived compaction"
        );
    }
    for p in &plaintexts {
        assert_eq!(
            disk_contains(&data, p.as_bytes()),
            None,
            "plaintext on disk"
        );
    }
    let after = laptop
        .client
        .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
        .await
        .expect("pending");
    assert!(after.messages.is_empty());
    // The chat goes on after compaction.
    let text = marker("after");
    phone
        .client
        .secret_send(&mut phone.keys, chat, &text, 60_000, 0, now_ms())
        .await
        .expect("send");
    let m = next_secret(&mut laptop).await;
    let opened = laptop
        .client
        .secret_receive(&mut laptop.keys, &m)
        .await
        .unwrap();
    assert_eq!(opened.text, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_erased_without_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let u = users(&server.clients).await;
    let mut phone = device(&server.clients, &u.alice, "phone", keys.path()).await;
    let laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
    let chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .unwrap();
    // Sealed here so the test knows the ciphertext bytes; a 1 s TTL.
    let text = marker("expiring");
    let sealed = phone.keys.seal(chat, &text, 0, now_ms()).unwrap();
    let sent = phone
        .client
        .secret_send_request(v1::SecretSendRequest {
            secret_chat_id: chat,
            counter: sealed.counter,
            epoch: sealed.epoch,
            ttl_ms: 1000,
            self_destruct_s: 0,
            ciphertext: sealed.ciphertext.clone().into(),
        })
        .await
        .expect("send");
    assert!(sent.expires_at_ms > 0);
    assert!(disk_contains(&data, &sealed.ciphertext).is_some());
    // Nobody writes anything; the leader's tick expires it.
    let deadline = Instant::now() + WAIT;
    loop {
        let p = laptop
            .client
            .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
            .await
            .unwrap();
        if p.messages.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the message never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(now_ms() >= sent.expires_at_ms, "gone before its deadline");
    server.compact().await;
    assert_eq!(
        disk_contains(&data, &sealed.ciphertext),
        None,
        "an expired ciphertext survived compaction"
    );
    assert_eq!(disk_contains(&data, text.as_bytes()), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_replayed_and_misrouted_ciphertexts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "127.0.0.1:0");
    let u = users(&server.clients).await;
    let mut phone = device(&server.clients, &u.alice, "phone", keys.path()).await;
    let mut laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
    let chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .unwrap();
    let other_chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .unwrap();
    assert_ne!(chat, other_chat);
    let raw = |s: &chatlog_wire::secret::Sealed, chat: u64| v1::SecretSendRequest {
        secret_chat_id: chat,
        counter: s.counter,
        epoch: s.epoch,
        ttl_ms: 60_000,
        self_destruct_s: s.self_destruct_s,
        ciphertext: s.ciphertext.clone().into(),
    };

    // Tampered on the way: one ciphertext byte flipped.
    let mut s = phone.keys.seal(chat, "tamper me", 0, now_ms()).unwrap();
    let last = s.ciphertext.len() - 1;
    s.ciphertext[last] ^= 1;
    phone
        .client
        .secret_send_request(raw(&s, chat))
        .await
        .unwrap();
    let m = next_secret(&mut laptop).await;
    match laptop.client.secret_receive(&mut laptop.keys, &m).await {
        Err(SecretFlowError::Device(SecretError::Tampered { .. })) => {}
        other => panic!("tampered: {other:?}"),
    }

    // Misrouted: sealed for one chat, relayed in the other.
    let s = phone.keys.seal(chat, "wrong chat", 0, now_ms()).unwrap();
    phone
        .client
        .secret_send_request(raw(&s, other_chat))
        .await
        .unwrap();
    let m = next_secret(&mut laptop).await;
    assert_eq!(m.secret_chat_id, other_chat);
    match laptop.client.secret_receive(&mut laptop.keys, &m).await {
        Err(SecretFlowError::Device(SecretError::Tampered { .. })) => {}
        other => panic!("misrouted: {other:?}"),
    }

    // A genuine one opens; relayed again it is a replay. The server refuses a reused
    // counter too.
    let s = phone.keys.seal(chat, "genuine", 0, now_ms()).unwrap();
    phone
        .client
        .secret_send_request(raw(&s, chat))
        .await
        .unwrap();
    let m = next_secret(&mut laptop).await;
    let opened = laptop
        .client
        .secret_receive(&mut laptop.keys, &m)
        .await
        .expect("genuine opens");
    assert_eq!(opened.text, "genuine");
    match laptop.client.secret_receive(&mut laptop.keys, &m).await {
        Err(SecretFlowError::Device(SecretError::Replayed { .. })) => {}
        other => panic!("replayed: {other:?}"),
    }
    let again = phone
        .client
        .secret_send_request(raw(&s, chat))
        .await
        .expect_err("a reused counter");
    assert_eq!(server_code(again), v1::ErrorCode::Conflict);
    // Reordered: an older message fetched after a newer one opened.
    let pending = laptop
        .client
        .secret_pending(v1::SecretPendingRequest {
            secret_chat_id: chat,
        })
        .await
        .unwrap();
    let older = pending
        .messages
        .iter()
        .find(|m| m.counter < opened.counter)
        .expect("the tampered one still waits (never acknowledged)");
    assert!(matches!(
        laptop.keys.open(older),
        Err(SecretError::Replayed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_messages_survive_a_sigkill_and_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, "127.0.0.1:0");
    let listen = server.clients.clone();
    let u = users(&server.clients).await;
    let mut phone = device(&server.clients, &u.alice, "phone", keys.path()).await;
    {
        // Bob's laptop publishes its key, then goes offline.
        let laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
        drop(laptop);
    }
    let chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .unwrap();
    let mut texts = Vec::new();
    for i in 0..3 {
        let text = marker(&format!("offline-{i}"));
        phone
            .client
            .secret_send(&mut phone.keys, chat, &text, 600_000, 0, now_ms())
            .await
            .unwrap();
        texts.push(text);
    }
    server.kill();
    let server = Server::start(&data, &listen);
    let mut laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
    let deadline = Instant::now() + WAIT;
    let pending = loop {
        match laptop
            .client
            .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
            .await
        {
            Ok(p) => break p,
            // Leaders are still being elected after the restart.
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
            .client
            .secret_receive(&mut laptop.keys, m)
            .await
            .unwrap();
        assert_eq!(&o.text, text);
    }
    laptop
        .client
        .secret_ack(v1::SecretAckRequest {
            secret_chat_id: chat,
            counter: 3,
        })
        .await
        .unwrap();
    assert!(
        laptop
            .client
            .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
            .await
            .unwrap()
            .messages
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_rekeyed_after_n_messages_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "127.0.0.1:0");
    let u = users(&server.clients).await;
    let mut phone = device(&server.clients, &u.alice, "phone", keys.path()).await;
    let mut laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
    let chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .unwrap();
    let total = REKEY_MESSAGES + 5;
    laptop
        .client
        .secret_refresh_chats(&mut laptop.keys)
        .await
        .unwrap();
    // Bob reads as the messages come, in pages, acknowledging each page.
    let mut opened = 0u64;
    let mut epochs = std::collections::BTreeSet::new();
    let mut sent = 0u64;
    while opened < total {
        while sent < total && sent < opened + 300 {
            sent += 1;
            phone
                .client
                .secret_send(
                    &mut phone.keys,
                    chat,
                    &format!("n{sent}"),
                    600_000,
                    0,
                    now_ms(),
                )
                .await
                .unwrap();
        }
        let page = laptop
            .client
            .secret_pending(v1::SecretPendingRequest {
                secret_chat_id: chat,
            })
            .await
            .unwrap();
        for m in &page.messages {
            let o = laptop.keys.open(m).expect("opens across epochs");
            opened += 1;
            assert_eq!(o.text, format!("n{opened}"));
            epochs.insert(o.epoch);
        }
        if let Some(m) = page.messages.last() {
            laptop
                .client
                .secret_ack(v1::SecretAckRequest {
                    secret_chat_id: chat,
                    counter: m.counter,
                })
                .await
                .unwrap();
        }
    }
    assert_eq!(epochs.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(laptop.keys.chat(chat).unwrap().recv_epoch(), 1);
    // Pushes of the same messages arrived too; they are duplicates now.
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_millis(100), laptop.pushes.recv()).await
    {
        if let PushItem::Push {
            push: push::Kind::SecretMessage(m),
            ..
        } = item
        {
            assert!(matches!(
                laptop.keys.open(&m),
                Err(SecretError::Replayed { .. })
            ));
        }
    }
}

/// Runs the CLI; returns stdout, failing on a non-zero exit.
fn cli(args: &[&str], keys: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(args)
        .arg("--keys-dir")
        .arg(keys)
        .env_remove("CHATLOG_TOKEN")
        .output()
        .expect("chatlog runs");
    assert!(
        out.status.success(),
        "chatlog {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cli_plain(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(args)
        .env_remove("CHATLOG_TOKEN")
        .output()
        .expect("chatlog runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_sends_and_tails() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "127.0.0.1:0");
    let s = server.clients.as_str();
    let alice = cli_plain(&[
        "user", "create", "alice", "--device", "phone", "--server", s, "--json",
    ]);
    let bob = cli_plain(&[
        "user", "create", "bob", "--device", "laptop", "--server", s, "--json",
    ]);
    let (at, bt) = (
        alice["token"].as_str().unwrap(),
        bob["token"].as_str().unwrap(),
    );
    let bob_id = bob["user_id"].as_u64().unwrap();
    // Bob's device publishes its key.
    let key: Value = serde_json::from_str(&cli(
        &["secret", "key", "--server", s, "--token", bt, "--json"],
        keys.path(),
    ))
    .unwrap();
    assert_eq!(key["device_id"], "laptop");
    let peer = format!("{bob_id}/laptop");
    let started: Value = serde_json::from_str(&cli(
        &[
            "secret", "start", &peer, "--server", s, "--token", at, "--json",
        ],
        keys.path(),
    ))
    .unwrap();
    let chat = started["secret_chat_id"].as_u64().unwrap().to_string();
    let text = marker("cli");
    let sent: Value = serde_json::from_str(&cli(
        &[
            "secret",
            "send",
            &chat,
            &text,
            "--self-destruct",
            "10",
            "--server",
            s,
            "--token",
            at,
            "--json",
        ],
        keys.path(),
    ))
    .unwrap();
    assert_eq!(sent["counter"], 1);
    let tailed = cli(
        &[
            "secret", "tail", "--limit", "1", "--server", s, "--token", bt, "--json",
        ],
        keys.path(),
    );
    let m: Value = serde_json::from_str(tailed.lines().next().unwrap()).unwrap();
    assert_eq!(m["text"], text.as_str());
    assert_eq!(m["self_destruct_s"], 10);
    assert!(m["destruct_at_ms"].as_u64().is_some());
    // Acknowledged by tail: nothing waits any more.
    let list: Value = serde_json::from_str(&cli(
        &["secret", "list", "--server", s, "--token", bt, "--json"],
        keys.path(),
    ))
    .unwrap();
    assert_eq!(list["chats"][0]["keys_here"], true);
    assert_eq!(list["chats"][0]["started_here"], false);
}

/// Waits until `GET /ready` answers 200: every local group knows its leader.
async fn wait_ready(http: &str) {
    let deadline = Instant::now() + WAIT * 3;
    loop {
        if let Ok(r) = request(http, "GET", "/ready", None, None, WAIT).await
            && r.status == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{http} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_erases_the_ciphertext() {
    let keys = tempfile::tempdir().unwrap();
    let options = cluster::Options {
        http: true,
        extra: vec!["--segment-mb".into(), "1".into()],
        ..cluster::Options::default()
    };
    let cluster = tokio::task::block_in_place(|| cluster::Cluster::start(options));
    // (HTTP address, data directory) of every node.
    let nodes: Vec<(String, PathBuf)> = cluster
        .ids()
        .map(|id| (cluster.http_addr(id), cluster.dir(id)))
        .collect();
    for (http, _) in &nodes {
        wait_ready(http).await;
    }
    let first = cluster.addr(1);
    let u = users(&first).await;
    let (alice, bob) = (u.alice, u.bob);
    // Alice on node 1, Bob's laptop on node 2.
    let mut phone = device(&first, &alice, "phone", keys.path()).await;
    let mut laptop = device(&cluster.addr(2), &bob, "laptop", keys.path()).await;
    let chat = phone
        .client
        .secret_start(&mut phone.keys, bob.0, "laptop")
        .await
        .expect("start");
    let mut sent = Vec::new();
    for i in 0..3 {
        let text = marker(&format!("cluster-{i}"));
        let sealed = phone.keys.seal(chat, &text, 0, now_ms()).unwrap();
        phone
            .client
            .secret_send_request(v1::SecretSendRequest {
                secret_chat_id: chat,
                counter: sealed.counter,
                epoch: sealed.epoch,
                ttl_ms: 600_000,
                self_destruct_s: 0,
                ciphertext: sealed.ciphertext.clone().into(),
            })
            .await
            .expect("send");
        sent.push((text, sealed.ciphertext));
    }
    let pending = laptop
        .client
        .secret_pending(v1::SecretPendingRequest { secret_chat_id: 0 })
        .await
        .expect("pending on node 2");
    assert_eq!(pending.messages.len(), 3);
    for (m, (text, _)) in pending.messages.iter().zip(&sent) {
        let o = laptop
            .client
            .secret_receive(&mut laptop.keys, m)
            .await
            .unwrap();
        assert_eq!(&o.text, text);
    }
    // Replicated: every node holds the ciphertexts (a majority at once, the third soon).
    for (http, dir) in &nodes {
        let deadline = Instant::now() + WAIT;
        for (text, ct) in &sent {
            while disk_contains(dir, ct).is_none() {
                assert!(Instant::now() < deadline, "{http} never got it");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(disk_contains(dir, text.as_bytes()), None);
        }
    }
    laptop
        .client
        .secret_ack(v1::SecretAckRequest {
            secret_chat_id: chat,
            counter: 3,
        })
        .await
        .expect("ack");
    // Each node zeroes its own copy once it applied the ack; compaction removes it.
    for (http, dir) in &nodes {
        let deadline = Instant::now() + WAIT;
        while let Some(file) = sent.iter().find_map(|(_, ct)| disk_contains(dir, ct)) {
            assert!(
                Instant::now() < deadline,
                "a ciphertext stayed on the disk of {http}, in {}",
                file.display()
            );
            compact(http).await;
        }
        for (text, _) in &sent {
            assert_eq!(disk_contains(dir, text.as_bytes()), None);
        }
    }
}

/// On four nodes with three replicas per group, node 1 hosts no replica of group 1
/// (static placement: group 1 on nodes 2, 3, 4). A secret chat between two users of
/// group 1 lives in group 1 (its home is the group of the lower user id), so node 1 learns
/// of its messages only through its cross-node fan-out poller (`src/fanout/remote.rs`).
/// A device on node 1 gets each message pushed live, opens it, and no other device of
/// its user on node 1 gets anything; the replies reach the other device on node 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_a_node_without_a_replica_gets_secret_messages_pushed() {
    const VIEWER_NODE: u64 = 1;
    const CHAT_GROUP: u64 = 1;
    let keys = tempfile::tempdir().unwrap();
    let cluster = tokio::task::block_in_place(|| {
        cluster::Cluster::start(cluster::Options::more_nodes_than_replicas())
    });
    let setup = anonymous(&cluster.addr(3)).await;
    // Users are placed round-robin over the groups: create until two live in group 1.
    let mut in_chat_group = Vec::new();
    for n in 0.. {
        let created = create_user(&setup, &format!("user{n}")).await;
        if group_of(created.0) == CHAT_GROUP {
            in_chat_group.push(created);
            if in_chat_group.len() == 2 {
                break;
            }
        }
    }
    let (alice, bob) = (in_chat_group[0].clone(), in_chat_group[1].clone());
    let viewer = cluster.addr(VIEWER_NODE);
    let mut phone = device(&viewer, &alice, "phone", keys.path()).await;
    let mut desktop = device(&viewer, &alice, "desktop", keys.path()).await;
    let mut laptop = device(&cluster.addr(3), &bob, "laptop", keys.path()).await;
    // Warm-up: node 1's poller of group 1 may still be finding its first replica right
    // after start (what is applied before its first answer is history, not pushed).
    // Post to a chat of group 1 until the phone sees a post live.
    let warm = loop {
        let created = laptop
            .client
            .create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: "warm-up".into(),
                member_ids: vec![alice.0],
            })
            .await
            .expect("chat created");
        if group_of(created.chat_id) == CHAT_GROUP {
            break created.chat_id;
        }
    };
    let deadline = Instant::now() + WAIT;
    'warm: for cmid in 1.. {
        assert!(
            Instant::now() < deadline,
            "no live push reached node {VIEWER_NODE}"
        );
        laptop
            .client
            .send_message(v1::SendMessageRequest {
                chat_id: warm,
                client_message_id: cmid,
                text: "warm-up".into(),
                ..Default::default()
            })
            .await
            .expect("post");
        while let Ok(Some(item)) =
            tokio::time::timeout(Duration::from_millis(200), phone.pushes.recv()).await
        {
            if let PushItem::Push {
                push: push::Kind::ChatEvents(_),
                ..
            } = item
            {
                break 'warm;
            }
        }
    }
    let chat = laptop
        .client
        .secret_start(&mut laptop.keys, alice.0, "phone")
        .await
        .expect("start");
    assert_eq!(
        group_of(chat),
        CHAT_GROUP,
        "the secret chat must live where node {VIEWER_NODE} has no replica"
    );
    for i in 0..3 {
        let text = marker(&format!("to-node-1-{i}"));
        let (_, opened) = send_and_open(&mut laptop, &mut phone, chat, &text, 0).await;
        assert_eq!(opened.counter, i + 1);
    }
    send_and_open(&mut phone, &mut laptop, chat, &marker("reply"), 0).await;
    no_secret_pushed(&mut desktop).await;
}

/// With push notifications on, a secret message for a device that is offline yields a
/// notification for that device that says only that something arrived: no text, no
/// ciphertext, no sender, no secret chat; and none for the sender's or another device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_is_notified_that_something_arrived_and_nothing_more() {
    let (hook, rx) = webhook::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &["--push-webhook", &hook, "--push-collapse-ms", "100"],
    );
    let u = users(&server.clients).await;
    let mut phone = device(&server.clients, &u.alice, "phone", keys.path()).await;
    {
        // Bob's laptop publishes its key, then goes offline; his tablet stays online.
        let laptop = device(&server.clients, &u.bob, "laptop", keys.path()).await;
        drop(laptop);
    }
    let _tablet = device(&server.clients, &u.bob, "tablet", keys.path()).await;
    let chat = phone
        .client
        .secret_start(&mut phone.keys, u.bob.0, "laptop")
        .await
        .unwrap();
    let text = marker("notified");
    phone
        .client
        .secret_send(&mut phone.keys, chat, &text, 600_000, 0, now_ms())
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let found = loop {
        let secret: Vec<Value> = rx
            .requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, body)| {
                body["notifications"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|n| n["kind"] == "secret")
            .collect();
        if !secret.is_empty() {
            break secret;
        }
        assert!(Instant::now() < deadline, "no secret notification arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(found.len(), 1, "{found:?}");
    let n = found[0].as_object().expect("an object");
    assert_eq!(n["user_id"], u.bob.0);
    assert_eq!(n["device_id"], "laptop", "for the target device only");
    let mut fields: Vec<&str> = n.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["device_id", "id", "kind", "timestamp_ms", "user_id"],
        "nothing but that something arrived"
    );
    for (_, body) in rx.requests.lock().unwrap().iter() {
        assert!(!body.to_string().contains(&text), "no plaintext");
    }
}
