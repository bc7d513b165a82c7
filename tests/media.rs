//! Black-box: media uploads and downloads against real `chatlog serve` processes on
//! 127.0.0.1, through the `chatlog upload` / `download` commands and the client library.
//!
//! Covered: a 100 MiB upload interrupted by SIGKILL of the uploading client and of the
//! server, resumed and compared byte for byte after download (itself interrupted and
//! resumed); ranged downloads; dedupe (stored once on disk); permission refusals; bad
//! part checksums, out-of-range parts and a hash mismatch at finish, with nothing
//! visible afterwards; limits answered with RESOURCE_EXHAUSTED; expiry of abandoned
//! uploads freeing their files; and a 3-node cluster whose leader of the uploader's group
//! is killed mid-upload: every acknowledged part is on a surviving replica, and the
//! upload resumes on a survivor and finishes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_wire::client::{
    Client, ClientError, ClientOptions, DownloadCheck, UploadOptions, media_id_hex,
};
use chatlog_wire::limits::MEDIA_PART_BYTES;
use chatlog_wire::proto::v1::{self, ErrorCode};
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[path = "common/server.rs"]
mod server;

use server::Server;

const BIN: &str = env!("CARGO_BIN_EXE_chatlog");

/// Longest any wait for a condition lasts before the test fails.
const WAIT_MAX: Duration = Duration::from_secs(60);

fn seed() -> u64 {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed={seed} (rerun with CHATLOG_TEST_SEED={seed})");
    seed
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, &data).expect("writes the file");
    data
}

/// A logged-in user: the client, the id and the session token.
struct User {
    client: Client,
    id: u64,
    token: String,
}

async fn user(addr: &str, name: &str) -> User {
    let anon = Client::connect(addr, ClientOptions::default())
        .await
        .expect("connects");
    let created = anon
        .create_user(v1::CreateUserRequest { name: name.into() })
        .await
        .expect("creates the user");
    let login = anon
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: "test".into(),
            device_name: String::new(),
        })
        .await
        .expect("logs in");
    let client = Client::connect(
        addr,
        ClientOptions {
            token: Some(login.session_token.clone()),
            ..ClientOptions::default()
        },
    )
    .await
    .expect("connects with the token");
    User {
        client,
        id: created.user_id,
        token: login.session_token,
    }
}

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server { code, .. } => code,
        other => panic!("expected a server error, got {other}"),
    }
}

fn chatlog(addr: &str, token: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .args(["--server", addr, "--token", token, "--json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn json_of(child: Child) -> Value {
    let out = child.wait_with_output().expect("waits");
    assert!(
        out.status.success(),
        "chatlog failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prints JSON")
}

/// Polls `f` until it returns `Some`, at most [`WAIT_MAX`].
async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The upload id `chatlog upload` remembered in its resume directory.
fn remembered_upload(resume_dir: &Path) -> Option<u64> {
    let entry = std::fs::read_dir(resume_dir).ok()?.next()?.ok()?;
    std::fs::read_to_string(entry.path())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Parts of an upload the server holds, by the server's own status.
async fn held_parts(client: &Client, upload_id: u64) -> Option<(u32, u32)> {
    let s = client
        .media_upload_status(v1::MediaUploadStatusRequest { upload_id })
        .await
        .ok()?;
    Some((s.part_count - s.missing_parts.len() as u32, s.part_count))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_upload_survives_killed_clients_and_a_server_restart() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let resume_dir = dir.path().join("resume");
    let file = dir.path().join("video.mp4");
    let data = random_file(&file, 100 * 1024 * 1024, seed);
    let parts_total = data.len().div_ceil(MEDIA_PART_BYTES as usize) as u32;
    let server = Server::start(&data_dir, &[]);
    let addr = server.addr.clone();
    let alice = user(&addr, "alice").await;
    let upload_args = [
        "upload",
        file.to_str().expect("utf-8 path"),
        "--resume-dir",
        resume_dir.to_str().expect("utf-8 path"),
    ];

    // 1. The uploading client is killed once the server holds some parts.
    let mut child = chatlog(&addr, &alice.token, &upload_args)
        .spawn()
        .expect("spawns");
    let upload_id = wait_for("the upload id to be remembered", async || {
        remembered_upload(&resume_dir)
    })
    .await;
    wait_for("10 parts held", async || {
        held_parts(&alice.client, upload_id)
            .await
            .filter(|(held, _)| *held >= 10)
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let (held_after_client_kill, total) = held_parts(&alice.client, upload_id)
        .await
        .expect("the upload is still there");
    assert_eq!(total, parts_total);
    assert!(
        held_after_client_kill < total,
        "the client was killed before the upload finished"
    );

    // 2. The same command resumes; the server is killed once more parts are held, and
    // restarted on the same data directory and address.
    let mut child = chatlog(&addr, &alice.token, &upload_args)
        .spawn()
        .expect("spawns");
    let held_before_server_kill = wait_for("more parts held", async || {
        held_parts(&alice.client, upload_id)
            .await
            .map(|(held, _)| held)
            .filter(|held| *held >= held_after_client_kill + 20)
    })
    .await;
    server.kill();
    let _ = child.kill();
    child.wait().expect("reaped");
    assert_eq!(
        remembered_upload(&resume_dir),
        Some(upload_id),
        "the resumed client kept the same upload"
    );
    let server = Server::start_on(&data_dir, &addr, &[]);
    let alice_client = Client::connect(
        &addr,
        ClientOptions {
            token: Some(alice.token.clone()),
            ..ClientOptions::default()
        },
    )
    .await
    .expect("reconnects");
    let (held_after_restart, _) = held_parts(&alice_client, upload_id)
        .await
        .expect("the upload survived the restart");
    assert!(
        held_after_restart >= held_before_server_kill,
        "every acknowledged part survived: {held_after_restart} < {held_before_server_kill}"
    );
    assert!(held_after_restart < total);

    // 3. Resumed to the end.
    let out = json_of(
        chatlog(&addr, &alice.token, &upload_args)
            .spawn()
            .expect("spawns"),
    );
    let media_id = out["media_id"].as_str().expect("media id").to_string();
    assert_eq!(media_id, media_id_hex(&Sha256::digest(&data)));
    assert_eq!(out["size_bytes"].as_u64(), Some(data.len() as u64));
    assert_eq!(out["mime_type"].as_str(), Some("video/mp4"));
    assert!(
        files_in(&resume_dir).is_empty(),
        "the resume file is removed"
    );
    assert!(files_in(&data_dir.join("media/uploads")).is_empty());

    // 4. Downloaded (the first attempt killed midway, then resumed) and compared.
    let output = dir.path().join("copy.mp4");
    let part = dir.path().join("copy.mp4.part");
    let download_args = [
        "download",
        &media_id,
        "-o",
        output.to_str().expect("utf-8 path"),
    ];
    let mut child = chatlog(&addr, &alice.token, &download_args)
        .spawn()
        .expect("spawns");
    let interrupted = wait_for("a partial download", async || {
        if std::fs::metadata(&part).is_ok_and(|m| m.len() >= 8 * 1024 * 1024) {
            Some(true)
        } else if output.exists() {
            Some(false)
        } else {
            None
        }
    })
    .await;
    let _ = child.kill();
    child.wait().expect("reaped");
    let out = json_of(
        chatlog(&addr, &alice.token, &download_args)
            .spawn()
            .expect("spawns"),
    );
    if interrupted && out["resumed_from"].as_u64() == Some(0) {
        panic!("the second download did not resume: {out}");
    }
    let copy = std::fs::read(&output).expect("reads the copy");
    assert!(copy == data, "the downloaded file differs from the upload");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_dedupe_permissions_and_bad_input() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let server = Server::start(&data_dir, &[]);
    let addr = server.addr.clone();
    let (alice, bob, carol) = (
        user(&addr, "alice").await,
        user(&addr, "bob").await,
        user(&addr, "carol").await,
    );
    let file = dir.path().join("photo.png");
    let data = random_file(&file, 2 * MEDIA_PART_BYTES as usize + 4321, seed);
    let sha: [u8; 32] = Sha256::digest(&data).into();

    let first = alice
        .client
        .upload_file(&file, UploadOptions::default(), |_| {})
        .await
        .expect("uploads");
    assert!(!first.deduplicated);
    assert_eq!(first.media_id, media_id_hex(&sha));
    let media = first.media.clone().expect("a media ref");
    assert_eq!(media.mime_type, "", "no MIME type was given");
    assert_eq!(media.file_name, "photo.png");

    // Dedupe: bob uploads the same bytes; the same id, one file on disk.
    let second = bob
        .client
        .upload_file(&file, UploadOptions::default(), |_| {})
        .await
        .expect("uploads");
    assert_eq!(second.media_id, first.media_id);
    assert!(second.deduplicated);
    assert_eq!(files_in(&data_dir.join("media/files")).len(), 1);
    assert!(files_in(&data_dir.join("media/uploads")).is_empty());
    // Knowing the hash up front skips the upload for someone who may read the file.
    let again = alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: data.len() as u64,
            sha256: Bytes::copy_from_slice(&sha),
            ..Default::default()
        })
        .await
        .expect("starts");
    assert_eq!(again.upload_id, 0);
    assert_eq!(
        again.existing.map(|m| m.size_bytes),
        Some(data.len() as u64)
    );

    // Ranged downloads.
    let get = |client: &Client, offset: u64, length: u32| {
        let client = client.clone();
        async move {
            client
                .media_download(v1::MediaDownloadRequest {
                    sha256: Bytes::copy_from_slice(&sha),
                    offset,
                    length,
                })
                .await
        }
    };
    // Whole parts (the last one short) are answered from the mapping as a split frame
    // (head, then the bytes); the rest from a checked copy. Both decode the same.
    for (offset, length) in [
        (0u64, MEDIA_PART_BYTES),
        (MEDIA_PART_BYTES as u64, MEDIA_PART_BYTES),
        (2 * MEDIA_PART_BYTES as u64, MEDIA_PART_BYTES),
        (1000, 70_000),
        (MEDIA_PART_BYTES as u64 - 10, 20),
        (data.len() as u64 - 5, 1000),
        (12_345, MEDIA_PART_BYTES),
    ] {
        let r = get(&alice.client, offset, length).await.expect("reads");
        let end = (offset as usize + length as usize).min(data.len());
        assert!(
            r.data[..] == data[offset as usize..end],
            "range {offset}+{length}"
        );
        assert_eq!(r.crc32, crc32fast::hash(&r.data));
        assert_eq!(r.size_bytes, data.len() as u64);
    }
    // The whole file, checked (every chunk's CRC, the SHA-256) without an output file.
    assert_eq!(
        alice
            .client
            .download_checked(sha, 0, DownloadCheck::Sha256, |_| {})
            .await
            .expect("checked download"),
        data.len() as u64
    );
    for (offset, length) in [(data.len() as u64, 1), (0, 0), (0, MEDIA_PART_BYTES + 1)] {
        let e = get(&alice.client, offset, length)
            .await
            .expect_err("refused");
        assert_eq!(code(e), ErrorCode::BadRequest, "range {offset}+{length}");
    }

    // Permissions: carol neither uploaded it nor is in a chat it was sent to.
    let e = get(&carol.client, 0, 10).await.expect_err("refused");
    assert_eq!(code(e), ErrorCode::PermissionDenied);
    let carols = carol
        .client
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "carol's".into(),
            member_ids: vec![],
        })
        .await
        .expect("creates a chat");
    let e = carol
        .client
        .send_message(v1::SendMessageRequest {
            chat_id: carols.chat_id,
            client_message_id: 1,
            text: String::new(),
            media: Some(media.clone()),
            reply_to_seq: 0,
        })
        .await
        .expect_err("carol may not send what she cannot read");
    assert_eq!(code(e), ErrorCode::PermissionDenied);
    // A media id nobody stored.
    let mut unknown = media.clone();
    unknown.sha256 = Bytes::copy_from_slice(&[7u8; 32]);
    let e = alice
        .client
        .send_message(v1::SendMessageRequest {
            chat_id: carols.chat_id,
            client_message_id: 2,
            text: String::new(),
            media: Some(unknown),
            reply_to_seq: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(code(e), ErrorCode::NotFound);

    // Sending it to a chat grants its members read access.
    let team = alice
        .client
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "team".into(),
            member_ids: vec![carol.id],
        })
        .await
        .expect("creates a chat");
    alice
        .client
        .send_message(v1::SendMessageRequest {
            chat_id: team.chat_id,
            client_message_id: 3,
            text: "look".into(),
            media: Some(media.clone()),
            reply_to_seq: 0,
        })
        .await
        .expect("alice sends her file");
    let r = get(&carol.client, 0, 100)
        .await
        .expect("carol now reads it");
    assert!(r.data[..] == data[..100]);
    // And carol may now forward it.
    carol
        .client
        .send_message(v1::SendMessageRequest {
            chat_id: carols.chat_id,
            client_message_id: 4,
            text: String::new(),
            media: Some(media.clone()),
            reply_to_seq: 0,
        })
        .await
        .expect("a member of a chat it was sent to may send it on");

    // Bad input: nothing half-stored becomes visible.
    let small = vec![5u8; 1000];
    let up = alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: small.len() as u64,
            ..Default::default()
        })
        .await
        .expect("starts");
    let part = |index: u32, crc: u32, bytes: &[u8]| v1::MediaUploadPartRequest {
        upload_id: up.upload_id,
        part_index: index,
        crc32: crc,
        data: Bytes::copy_from_slice(bytes),
    };
    let bad_crc = alice
        .client
        .media_upload_part(part(0, crc32fast::hash(&small) ^ 1, &small))
        .await
        .expect_err("refused");
    assert_eq!(code(bad_crc), ErrorCode::BadRequest);
    let out_of_range = alice
        .client
        .media_upload_part(part(1, crc32fast::hash(&small), &small))
        .await
        .expect_err("refused");
    assert_eq!(code(out_of_range), ErrorCode::BadRequest);
    let status = alice
        .client
        .media_upload_status(v1::MediaUploadStatusRequest {
            upload_id: up.upload_id,
        })
        .await
        .expect("status");
    assert_eq!(status.missing_parts, vec![0], "nothing was stored");
    // Someone else's upload is not visible.
    let e = bob
        .client
        .media_upload_part(part(0, crc32fast::hash(&small), &small))
        .await
        .expect_err("refused");
    assert_eq!(code(e), ErrorCode::NotFound);
    alice
        .client
        .media_upload_part(part(0, crc32fast::hash(&small), &small))
        .await
        .expect("stored");
    let wrong = Sha256::digest(b"something else");
    let e = alice
        .client
        .media_upload_finish(v1::MediaUploadFinishRequest {
            upload_id: up.upload_id,
            sha256: Bytes::copy_from_slice(&wrong),
        })
        .await
        .expect_err("refused");
    assert_eq!(code(e), ErrorCode::BadRequest);
    let e = alice
        .client
        .media_download(v1::MediaDownloadRequest {
            sha256: Bytes::copy_from_slice(&wrong),
            offset: 0,
            length: 10,
        })
        .await
        .expect_err("nothing stored under the wrong hash");
    assert_eq!(code(e), ErrorCode::NotFound);
    assert_eq!(files_in(&data_dir.join("media/files")).len(), 1);
    assert!(
        files_in(&data_dir.join("media/uploads")).is_empty(),
        "the failed upload is deleted"
    );
    let e = alice
        .client
        .media_upload_status(v1::MediaUploadStatusRequest {
            upload_id: up.upload_id,
        })
        .await
        .expect_err("gone");
    assert_eq!(code(e), ErrorCode::NotFound);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_uploads_expire_and_limits_refuse_with_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let server = Server::start(
        &data_dir,
        &[
            "--media-upload-ttl-secs",
            "1",
            "--media-reserved-bytes",
            "10000000",
        ],
    );
    let alice = user(&server.addr, "alice").await;
    let up = alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: 6_000_000,
            ..Default::default()
        })
        .await
        .expect("starts");
    assert_eq!(up.expires_in_ms, 1000);
    let e = alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: 6_000_000,
            ..Default::default()
        })
        .await
        .expect_err("over the node's reserved bytes");
    assert_eq!(code(e), ErrorCode::ResourceExhausted);
    let data = vec![1u8; MEDIA_PART_BYTES as usize];
    alice
        .client
        .media_upload_part(v1::MediaUploadPartRequest {
            upload_id: up.upload_id,
            part_index: 0,
            crc32: crc32fast::hash(&data),
            data: Bytes::from(data),
        })
        .await
        .expect("a part is stored");
    assert_eq!(files_in(&data_dir.join("media/uploads")).len(), 1);
    let expired = wait_for("the upload to expire", async || {
        match alice
            .client
            .media_upload_status(v1::MediaUploadStatusRequest {
                upload_id: up.upload_id,
            })
            .await
        {
            Err(e) => Some(code(e)),
            Ok(_) => None,
        }
    })
    .await;
    assert_eq!(expired, ErrorCode::NotFound);
    assert!(
        files_in(&data_dir.join("media/uploads")).is_empty(),
        "the expired upload's file is deleted"
    );
    // Its space is free again.
    alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: 6_000_000,
            ..Default::default()
        })
        .await
        .expect("starts once the space is free");
    drop(server);
}

#[path = "common/cluster.rs"]
mod cluster;

/// The parts node `addr` holds of `upload_id` (as `alice`), or `None` when it answers no
/// status.
async fn held_on(addr: &str, token: &str, upload_id: u64) -> Option<Vec<u32>> {
    let client = cluster::connect_with(
        addr,
        cluster::client_options(Some(token.to_string()), Duration::from_secs(10), 3),
    )
    .await;
    let s = client
        .media_upload_status(v1::MediaUploadStatusRequest { upload_id })
        .await
        .ok()?;
    let missing: std::collections::BTreeSet<u32> = s.missing_parts.into_iter().collect();
    Some((0..s.part_count).filter(|p| !missing.contains(p)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_mid_upload_loses_no_acknowledged_part_and_the_upload_finishes() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("clip.bin");
    let data = random_file(&file, 16 * 1024 * 1024, seed);
    let part_bytes = MEDIA_PART_BYTES as u64;
    let mut cluster = cluster::Cluster::start(cluster::Options::default());
    let anon = cluster::connect_with(
        &cluster.addr(1),
        cluster::client_options(None, Duration::from_secs(10), 3),
    )
    .await;
    let (alice, token) = cluster::create_and_login(&anon, "alice", "dev").await;
    let group = chatlog_raft::chat::group_of(alice);
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    eprintln!("alice's group {group} is led by node {leader}");
    let client = cluster::connect_with(
        &cluster.addr(leader),
        cluster::client_options(Some(token.clone()), Duration::from_secs(10), 1),
    )
    .await;

    // Upload through the leader; kill it once a third of the parts are acknowledged.
    let upload_id = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let upload = {
        let (client, file, upload_id, acked) = (
            client.clone(),
            file.clone(),
            Arc::clone(&upload_id),
            Arc::clone(&acked),
        );
        tokio::spawn(async move {
            client
                .upload_file(
                    &file,
                    UploadOptions {
                        parts_in_flight: 4,
                        ..Default::default()
                    },
                    |p| {
                        upload_id.store(p.upload_id, Ordering::Relaxed);
                        acked.store(p.bytes_done, Ordering::Relaxed);
                    },
                )
                .await
        })
    };
    wait_for("a third of the parts acknowledged", async || {
        (acked.load(Ordering::Relaxed) >= data.len() as u64 / 3).then_some(())
    })
    .await;
    cluster.kill(leader);
    let interrupted = upload.await.expect("the upload task ends");
    let acked_bytes = acked.load(Ordering::Relaxed);
    assert!(
        interrupted.is_err() && acked_bytes < data.len() as u64,
        "the upload was cut short by the kill"
    );
    let upload_id = upload_id.load(Ordering::Relaxed);
    // Parts are acknowledged in order (the client pops them in order): 0..acked.
    let acked_parts = (acked_bytes / part_bytes) as u32;
    let survivors: Vec<u64> = cluster.ids().filter(|n| *n != leader).collect();
    let mut union = std::collections::BTreeSet::new();
    for n in &survivors {
        if let Some(held) = held_on(&cluster.addr(*n), &token, upload_id).await {
            union.extend(held);
        }
    }
    for p in 0..acked_parts {
        assert!(
            union.contains(&p),
            "acknowledged part {p} is on no surviving replica"
        );
    }

    // Resume on a survivor: it sends only what that node lacks, and finishes.
    let other = survivors[0];
    let client = cluster::connect_with(
        &cluster.addr(other),
        cluster::client_options(Some(token.clone()), Duration::from_secs(10), 5),
    )
    .await;
    let done = client
        .upload_file(
            &file,
            UploadOptions {
                resume_upload_id: Some(upload_id),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .expect("the resumed upload finishes on a surviving node");
    let sha: [u8; 32] = Sha256::digest(&data).into();
    assert_eq!(done.media_id, media_id_hex(&sha));
    let copy = dir.path().join("copy.bin");
    client
        .download_file(sha, &copy, Default::default(), |_| {})
        .await
        .expect("downloads from the node that finished");
    assert!(std::fs::read(&copy).expect("reads") == data);
    // The other survivor serves the same bytes, or says it does not hold them.
    let third = cluster::connect_with(
        &cluster.addr(survivors[1]),
        cluster::client_options(Some(token.clone()), Duration::from_secs(10), 5),
    )
    .await;
    let copy3 = dir.path().join("copy3.bin");
    let from_third = wait_for("the third node to know the upload", async || {
        match third
            .download_file(sha, &copy3, Default::default(), |_| {})
            .await
        {
            Err(ClientError::Server {
                code: ErrorCode::PermissionDenied | ErrorCode::NotFound,
                ..
            }) => None,
            other => Some(other),
        }
    })
    .await;
    match from_third {
        Ok(_) => assert!(std::fs::read(&copy3).expect("reads") == data),
        Err(e) => assert_eq!(code(e), ErrorCode::Unavailable),
    }
}

/// A tmpfs mounted on a temporary directory (needs CAP_SYS_ADMIN), unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size_mb: u64) -> std::io::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let c = |s: &[u8]| std::ffi::CString::new(s).expect("no NUL");
        let (src, target) = (c(b"tmpfs"), c(dir.path().as_os_str().as_encoded_bytes()));
        let data = c(format!("size={size_mb}m").as_bytes());
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target =
            std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The disk fills while an upload is in progress: the upload's space was reserved when it
/// started, so it still finishes; a new upload is refused with RESOURCE_EXHAUSTED and
/// leaves nothing behind. (Mounts a tmpfs: where that is not allowed the test says so and
/// passes without running; `CHATLOG_REQUIRE_MOUNT=1` makes that a failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_mid_upload_refuses_new_uploads_and_loses_nothing() {
    let fs = match Tmpfs::new(400) {
        Ok(fs) => fs,
        Err(e) if std::env::var_os("CHATLOG_REQUIRE_MOUNT").is_none() => {
            eprintln!("skipping: cannot mount a tmpfs ({e}); set CHATLOG_REQUIRE_MOUNT=1 to fail");
            return;
        }
        Err(e) => panic!("cannot mount a tmpfs: {e}"),
    };
    let data_dir = fs.dir.path().join("data");
    let server = Server::start(&data_dir, &["--segment-mb", "4"]);
    let alice = user(&server.addr, "alice").await;
    let data = vec![0x5au8; 3 * MEDIA_PART_BYTES as usize + 17];
    let up = alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: data.len() as u64,
            ..Default::default()
        })
        .await
        .expect("starts while there is room");
    let part = |i: u32| {
        let s = i as usize * MEDIA_PART_BYTES as usize;
        let bytes = &data[s..(s + MEDIA_PART_BYTES as usize).min(data.len())];
        v1::MediaUploadPartRequest {
            upload_id: up.upload_id,
            part_index: i,
            crc32: crc32fast::hash(bytes),
            data: Bytes::copy_from_slice(bytes),
        }
    };
    alice
        .client
        .media_upload_part(part(0))
        .await
        .expect("a part is stored");
    // Fill the file system with something else.
    {
        use std::io::Write;
        let mut junk = std::fs::File::create(fs.dir.path().join("junk")).expect("creates");
        let block = vec![1u8; 1 << 20];
        while junk.write_all(&block).is_ok() {}
        let _ = junk.sync_all();
    }
    for i in 1..4 {
        alice
            .client
            .media_upload_part(part(i))
            .await
            .expect("a part of an upload whose space was reserved is stored on a full disk");
    }
    let done = alice
        .client
        .media_upload_finish(v1::MediaUploadFinishRequest {
            upload_id: up.upload_id,
            sha256: Bytes::copy_from_slice(&Sha256::digest(&data)),
        })
        .await
        .expect("finishes on a full disk");
    let e = alice
        .client
        .media_upload_start(v1::MediaUploadStartRequest {
            size_bytes: 1_000_000,
            ..Default::default()
        })
        .await
        .expect_err("no room for another upload");
    assert_eq!(code(e), ErrorCode::ResourceExhausted);
    assert!(files_in(&data_dir.join("media/uploads")).is_empty());
    let sha: [u8; 32] = Sha256::digest(&data).into();
    assert_eq!(done.media_id, media_id_hex(&sha));
    let r = alice
        .client
        .media_download(v1::MediaDownloadRequest {
            sha256: Bytes::copy_from_slice(&sha),
            offset: 3 * MEDIA_PART_BYTES as u64,
            length: 100,
        })
        .await
        .expect("reads the stored file");
    assert!(r.data[..] == data[3 * MEDIA_PART_BYTES as usize..]);
    drop(server);
}
