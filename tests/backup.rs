//! Black-box: `chatlog admin backup` of a real `chatlog serve` under writes, `chatlog
//! restore` into a fresh data directory, and the restored node serving what was
//! acknowledged.
//!
//! One node: two users, a chat, a media upload sent in a message, then writers that keep
//! sending while the backup runs (as a child process, like an operator would). The node
//! is then killed; the backup is restored into a fresh directory and a new process started
//! on it: every message acknowledged before the backup started is there at its seq with
//! its text, the old session tokens still authenticate, new sends continue the chat's
//! seqs, and the media downloads byte for byte. Then the refusals: a flipped byte in a
//! group file, a missing media file, a missing manifest and a non-empty target directory
//! each stop `restore` with an error naming the file, and write nothing.
//!
//! The seed (file contents) is printed; `CHATLOG_TEST_SEED` repeats a run.

#[path = "common/cluster.rs"]
mod cluster;
use cluster::send_request;
#[path = "common/server.rs"]
mod server;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatlog_wire::client::{Client, UploadOptions};
use chatlog_wire::proto::v1::{self, event::Body};
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use server::{NO_RATE_LIMITS, Server};

/// Runs `chatlog ARGS`; Ok(stdout) on success, Err(stderr) on failure.
fn chatlog(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(args)
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .output()
        .expect("chatlog runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 3),
    )
    .await
}

/// (seq, text) of every message posted in `chat`, as `client`'s node serves it.
async fn posted(client: &Client, chat: u64) -> Vec<(u64, String)> {
    cluster::full_history(client, chat, Duration::from_secs(30))
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::MessagePosted(m)) => Some((e.seq, m.text)),
            _ => None,
        })
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_writes_restores_into_a_fresh_node() {
    let seed = cluster::seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let node = Server::start(&data, &NO_RATE_LIMITS);
    let addr = node.addr.clone();
    let http = node.http.clone().expect("the node prints its HTTP address");

    let anon = connect(&addr, None).await;
    let (alice, alice_token) = cluster::create_and_login(&anon, "alice", "phone").await;
    let (bob, bob_token) = cluster::create_and_login(&anon, "bob", "laptop").await;
    let a = connect(&addr, Some(alice_token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "backed up".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat created")
        .chat_id;
    // A media file of a few parts, sent in the chat.
    let photo = dir.path().join("photo.bin");
    let mut bytes = vec![0u8; 1_300_000];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    std::fs::write(&photo, &bytes).expect("writes the photo");
    let uploaded = a
        .upload_file(&photo, UploadOptions::default(), |_| {})
        .await
        .expect("uploads");
    let media_id = uploaded.media_id.clone();
    a.send_message(v1::SendMessageRequest {
        media: uploaded.media.clone(),
        ..send_request(chat, 1, "the photo")
    })
    .await
    .expect("media message sent");

    // Writers keep sending while the backup runs; each ack is recorded with its time.
    let acks: Arc<Mutex<Vec<(Instant, u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for lane in 0..2u64 {
        let (acks, stop) = (Arc::clone(&acks), Arc::clone(&stop));
        let client = connect(&addr, Some(alice_token.clone())).await;
        writers.push(tokio::spawn(async move {
            let mut cmid = 1_000_000 * (lane + 1);
            while !stop.load(Ordering::Relaxed) {
                cmid += 1;
                let text = format!("lane {lane} message {cmid}");
                let r = client
                    .send_message(send_request(chat, cmid, &text))
                    .await
                    .unwrap_or_else(|e| panic!("send {cmid}: {e}"));
                acks.lock()
                    .expect("lock")
                    .push((Instant::now(), r.seq, text));
            }
        }));
    }
    // Some history first, so the backup copies a log of some length.
    while acks.lock().expect("lock").len() < 300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A checkpoint of every group first, so the backup carries state plus the log after
    // it (not only a log from the start).
    let snap =
        json(&chatlog(&["admin", "snapshot", "--server", &http, "--json"]).expect("snapshot"));
    assert_eq!(snap["done"], true, "{snap}");
    let chat_group = chatlog_raft::chat::group_of(chat);
    let checkpointed = snap["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"].as_u64() == Some(chat_group))
        .and_then(|g| g["checkpoint"].as_u64())
        .expect("the chat's group has a checkpoint");
    while acks.lock().expect("lock").len() < 400 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let backup = dir.path().join("backup");
    let started = Instant::now();
    let out = {
        let (http, backup) = (http.clone(), backup.clone());
        tokio::task::spawn_blocking(move || {
            chatlog(&[
                "admin",
                "backup",
                "--server",
                &http,
                "--out",
                backup.to_str().expect("utf-8"),
                "--json",
            ])
        })
        .await
        .expect("joins")
        .expect("backup succeeds")
    };
    let took = started.elapsed();
    // A little more traffic after the backup: it must not be needed to restore.
    let after = acks.lock().expect("lock").len();
    while acks.lock().expect("lock").len() < after + 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer ran without an error");
    }
    let report = json(&out);
    eprintln!(
        "backup: {} groups, {} media, {} bytes in {took:?}",
        report["groups"], report["media"], report["bytes"]
    );
    assert_eq!(report["media"], 1, "{report}");
    assert!(report["groups"].as_u64().expect("groups") >= 5, "{report}");
    assert!(files_in(&backup.join("media")).contains(&media_id));
    let manifest = json(&std::fs::read_to_string(backup.join("manifest.json")).expect("reads"));
    let row = manifest["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"].as_u64() == Some(chat_group))
        .expect("the chat's group is backed up")
        .clone();
    let cp = row["checkpoint_index"].as_u64().expect("a checkpoint");
    assert!(
        cp >= checkpointed && cp < row["applied_index"].as_u64().expect("applied"),
        "{row}"
    );
    let before: Vec<(u64, String)> = acks
        .lock()
        .expect("lock")
        .iter()
        .filter(|(t, _, _)| *t < started)
        .map(|(_, s, t)| (*s, t.clone()))
        .collect();
    assert!(before.len() >= 400);
    node.kill();

    // Restore into a fresh directory and start a new process on it.
    let restored = dir.path().join("restored");
    let out = chatlog(&[
        "restore",
        "--from",
        backup.to_str().expect("utf-8"),
        "--data-dir",
        restored.to_str().expect("utf-8"),
        "--json",
    ])
    .expect("restore succeeds");
    let r = json(&out);
    assert_eq!(r["media"], 1, "{r}");
    assert!(r["entries"].as_u64().expect("entries") > 300, "{r}");
    let node = Server::start(&restored, &NO_RATE_LIMITS);
    let a = connect(&node.addr, Some(alice_token.clone())).await;
    let b = connect(&node.addr, Some(bob_token.clone())).await;
    let history = posted(&a, chat).await;
    let by_seq: std::collections::BTreeMap<u64, String> = history.iter().cloned().collect();
    assert_eq!(by_seq.len(), history.len(), "one event per seq");
    for (seq, text) in &before {
        assert_eq!(
            by_seq.get(seq),
            Some(text),
            "message acknowledged at seq {seq} before the backup started"
        );
    }
    let head = history.last().expect("messages").0;
    eprintln!(
        "restored: {} messages up to seq {head}; {} were acknowledged before the backup",
        history.len(),
        before.len()
    );
    // Seqs are dense (1 is the membership event of the chat's creation, then posts).
    assert_eq!(
        history.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        ((head + 1 - history.len() as u64)..=head).collect::<Vec<_>>()
    );
    // Bob's old session works too, and the chat continues after the backed-up head.
    assert_eq!(posted(&b, chat).await.len(), history.len());
    let next = b
        .send_message(send_request(chat, 42, "after the restore"))
        .await
        .expect("sends after the restore");
    assert!(next.seq > head, "seq {} after head {head}", next.seq);
    let _ = alice;
    // The media: byte for byte.
    let copy = dir.path().join("photo.copy");
    let mut sha = [0u8; 32];
    for (i, pair) in media_id.as_bytes().chunks(2).enumerate() {
        sha[i] = u8::from_str_radix(std::str::from_utf8(pair).expect("hex"), 16).expect("hex");
    }
    b.download_file(sha, &copy, Default::default(), |_| {})
        .await
        .expect("downloads after the restore");
    assert!(
        std::fs::read(&copy).expect("reads") == bytes,
        "media differs"
    );
    drop(node);

    // Refusals: each names the file and writes nothing.
    let restore = |from: &Path, to: &Path| {
        chatlog(&[
            "restore",
            "--from",
            from.to_str().expect("utf-8"),
            "--data-dir",
            to.to_str().expect("utf-8"),
        ])
    };
    let fresh = dir.path().join("fresh");
    let e = restore(&backup, &restored).expect_err("a non-empty target is refused");
    assert!(e.contains("not empty"), "{e}");
    let group_file = backup.join("groups").join(
        files_in(&backup.join("groups"))
            .into_iter()
            .last()
            .expect("group files"),
    );
    let original = std::fs::read(&group_file).expect("reads");
    let mut damaged = original.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x01;
    std::fs::write(&group_file, &damaged).expect("writes");
    let name = format!(
        "groups/{}",
        group_file.file_name().expect("name").to_string_lossy()
    );
    let e = restore(&backup, &fresh).expect_err("a flipped byte is refused");
    assert!(e.contains(&name) && e.contains("damaged"), "{e}");
    assert!(
        !fresh.exists() || files_in(&fresh).is_empty(),
        "nothing written"
    );
    // A cut file too.
    std::fs::write(&group_file, &original[..original.len() - 7]).expect("writes");
    let e = restore(&backup, &fresh).expect_err("a cut file is refused");
    assert!(e.contains(&name), "{e}");
    std::fs::write(&group_file, &original).expect("writes");
    let media_file = backup.join("media").join(&media_id);
    let media_bytes = std::fs::read(&media_file).expect("reads");
    std::fs::remove_file(&media_file).expect("removes");
    let e = restore(&backup, &fresh).expect_err("a missing file is refused");
    assert!(
        e.contains(&format!("media/{media_id}")) && e.contains("missing"),
        "{e}"
    );
    std::fs::write(&media_file, &media_bytes).expect("writes");
    std::fs::rename(backup.join("manifest.json"), backup.join("m")).expect("renames");
    let e = restore(&backup, &fresh).expect_err("a backup without manifest is refused");
    assert!(e.contains("manifest.json is missing"), "{e}");
    std::fs::rename(backup.join("m"), backup.join("manifest.json")).expect("renames");
    assert!(
        !fresh.exists() || files_in(&fresh).is_empty(),
        "nothing written"
    );
    // Put back whole, it checks again.
    let out = chatlog(&[
        "restore",
        "--from",
        backup.to_str().expect("utf-8"),
        "--data-dir",
        fresh.to_str().expect("utf-8"),
        "--check-only",
    ])
    .expect("the repaired backup checks");
    assert!(out.contains("checks"), "{out}");
}

/// Three nodes: a backup under writes through node 1 (`--also` node 2), then the whole
/// cluster stops, each node's data directory is replaced by `chatlog restore --node-id N`
/// of that backup, and the three processes start again on their addresses (the placement
/// in group 0 names the peers' addresses, so a restored cluster keeps its node ids and
/// peer addresses). Every node then serves every send acknowledged before the backup
/// started, at its seq; sessions still work; the media downloads byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_backup_restores_into_a_fresh_cluster() {
    use cluster::{Cluster, Options};
    let seed = cluster::seed();
    let mut nodes = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            groups: 2,
            http: true,
            ..Options::default()
        })
    });
    let anon = connect(&nodes.addr(1), None).await;
    let (_alice, alice_token) = cluster::create_and_login(&anon, "alice", "phone").await;
    let (bob, bob_token) = cluster::create_and_login(&anon, "bob", "laptop").await;
    let a = connect(&nodes.addr(1), Some(alice_token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "backed up".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat created")
        .chat_id;
    let dir = tempfile::tempdir().expect("tempdir");
    let photo = dir.path().join("photo.bin");
    let mut bytes = vec![0u8; 700_000];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    std::fs::write(&photo, &bytes).expect("writes the photo");
    let uploaded = a
        .upload_file(&photo, UploadOptions::default(), |_| {})
        .await
        .expect("uploads");
    let media_id = uploaded.media_id.clone();
    a.send_message(v1::SendMessageRequest {
        media: uploaded.media.clone(),
        ..send_request(chat, 1, "the photo")
    })
    .await
    .expect("media message sent");

    let acks: Arc<Mutex<Vec<(Instant, u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for lane in 0..2u64 {
        let (acks, stop) = (Arc::clone(&acks), Arc::clone(&stop));
        let client = connect(&nodes.addr(1 + lane), Some(alice_token.clone())).await;
        writers.push(tokio::spawn(async move {
            let mut cmid = 1_000_000 * (lane + 1);
            while !stop.load(Ordering::Relaxed) {
                cmid += 1;
                let text = format!("lane {lane} message {cmid}");
                let r = client
                    .send_message(send_request(chat, cmid, &text))
                    .await
                    .unwrap_or_else(|e| panic!("send {cmid}: {e}"));
                acks.lock()
                    .expect("lock")
                    .push((Instant::now(), r.seq, text));
            }
        }));
    }
    while acks.lock().expect("lock").len() < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let backup = dir.path().join("backup");
    let started = Instant::now();
    let out = {
        let (h1, h2, backup) = (nodes.http_addr(1), nodes.http_addr(2), backup.clone());
        tokio::task::spawn_blocking(move || {
            chatlog(&[
                "admin",
                "backup",
                "--server",
                &h1,
                "--also",
                &h2,
                "--out",
                backup.to_str().expect("utf-8"),
                "--json",
            ])
        })
        .await
        .expect("joins")
        .expect("backup succeeds")
    };
    let report = json(&out);
    eprintln!(
        "backup of 3 nodes: {} groups, {} media, {} bytes in {:?}",
        report["groups"],
        report["media"],
        report["bytes"],
        started.elapsed()
    );
    assert_eq!(report["media"], 1, "{report}");
    let after = acks.lock().expect("lock").len();
    while acks.lock().expect("lock").len() < after + 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer ran without an error");
    }
    let before: Vec<(u64, String)> = acks
        .lock()
        .expect("lock")
        .iter()
        .filter(|(t, _, _)| *t < started)
        .map(|(_, s, t)| (*s, t.clone()))
        .collect();

    // The whole cluster goes; each node comes back from the backup alone.
    for id in 1..=3 {
        tokio::task::block_in_place(|| nodes.kill(id));
    }
    for id in 1..=3u64 {
        let node_dir = nodes.dir(id);
        std::fs::remove_dir_all(&node_dir).expect("old data removed");
        let out = chatlog(&[
            "restore",
            "--from",
            backup.to_str().expect("utf-8"),
            "--data-dir",
            node_dir.to_str().expect("utf-8"),
            "--node-id",
            &id.to_string(),
            "--json",
        ])
        .expect("restore succeeds");
        eprintln!("node {id}: restore {}", out.trim());
    }
    tokio::task::block_in_place(|| nodes.restart_all(&[1, 2, 3]));
    for id in 1..=3u64 {
        let c = connect(&nodes.addr(id), Some(bob_token.clone())).await;
        let by_seq: std::collections::BTreeMap<u64, String> =
            posted(&c, chat).await.into_iter().collect();
        for (seq, text) in &before {
            assert_eq!(
                by_seq.get(seq),
                Some(text),
                "node {id}: message acknowledged at seq {seq} before the backup started"
            );
        }
        eprintln!(
            "node {id}: {} messages; all {} acknowledged before the backup present",
            by_seq.len(),
            before.len()
        );
    }
    let b = connect(&nodes.addr(2), Some(bob_token.clone())).await;
    let head = posted(&b, chat).await.last().expect("messages").0;
    let next = b
        .send_message(send_request(chat, 42, "after the restore"))
        .await
        .expect("sends after the restore");
    assert!(next.seq > head);
    let copy = dir.path().join("photo.copy");
    let mut sha = [0u8; 32];
    for (i, pair) in media_id.as_bytes().chunks(2).enumerate() {
        sha[i] = u8::from_str_radix(std::str::from_utf8(pair).expect("hex"), 16).expect("hex");
    }
    b.download_file(sha, &copy, Default::default(), |_| {})
        .await
        .expect("downloads after the restore");
    assert!(
        std::fs::read(&copy).expect("reads") == bytes,
        "media differs"
    );
}
