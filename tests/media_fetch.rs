//! Black-box: a replica that missed media fetches it from the other replicas, against
//! real `chatlog serve` processes on 127.0.0.1 and their real data directories.
//!
//! Covered: a replica SIGKILLed while files are uploaded is restarted and, in the
//! background, ends with a copy of the file byte-identical to its peers' (checked in its
//! data directory) that it serves to a client connected to it alone; copies on the peers
//! that fail their part CRC (bytes flipped on disk) or whose parts check but whose
//! content is not the media id's (bytes and slot CRC rewritten on disk) are refused with
//! `UNAVAILABLE` naming why, and nothing is stored or served from them; once the peers'
//! files are repaired the same node fetches and serves the right bytes. And a replica
//! that `admin replica move` puts on a node that joined later ends with the group's
//! media, not only its log, and receives the parts of later uploads directly.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chatlog_wire::client::{Client, ClientError, UploadOptions, media_id_hex};
use chatlog_wire::limits::MEDIA_PART_BYTES;
use chatlog_wire::proto::v1::ErrorCode;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[path = "common/cluster.rs"]
mod cluster;

/// Longest any wait for a condition lasts before the test fails.
const WAIT_MAX: Duration = Duration::from_secs(60);
/// Bytes of a media file's header region (`src/media/store.rs`, file format).
const HEADER_BYTES: u64 = 4096;
/// Salt of a slot's own CRC (`src/media/store.rs`).
const SLOT_CRC_SALT: u32 = 0x4d45_4431;

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

/// Polls `f` until it returns `Some`, at most [`WAIT_MAX`].
async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where node data dir `dir` keeps finished file `sha`.
fn stored(dir: &Path, sha: &[u8; 32]) -> PathBuf {
    dir.join("media").join("files").join(media_id_hex(sha))
}

/// Writes `bytes` at `offset` of the file at `path` (a disk fault under a running node).
fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opens the stored file");
    f.write_all_at(bytes, offset).expect("overwrites");
    f.sync_all().expect("syncs");
}

/// Content offset of part `part` in a stored file.
fn part_at(part: u64) -> u64 {
    HEADER_BYTES + part * u64::from(MEDIA_PART_BYTES)
}

/// Rewrites part `part` of the stored file at `path` (content `data`) with `new` bytes
/// AND its slot with their CRC: the copy checks part by part but is not the media id's.
fn forge_part(path: &Path, data: &[u8], part: u64, new: &[u8]) {
    let pb = MEDIA_PART_BYTES as usize;
    let start = part as usize * pb;
    let len = (data.len() - start).min(pb);
    assert_eq!(new.len(), len);
    overwrite(path, part_at(part), new);
    let crc = crc32fast::hash(new);
    let mut slot = [0u8; 16];
    slot[..4].copy_from_slice(&crc.to_le_bytes());
    slot[4..8].copy_from_slice(&(part as u32).to_le_bytes());
    let check = crc32fast::hash(&slot[..8]) ^ SLOT_CRC_SALT;
    slot[8..12].copy_from_slice(&check.to_le_bytes());
    let slots = HEADER_BYTES + (data.len() as u64).next_multiple_of(4096);
    overwrite(path, slots + 16 * part, &slot);
}

async fn connect(addr: &str, token: &str, retries: u32) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(Some(token.to_string()), Duration::from_secs(20), retries),
    )
    .await
}

async fn upload(client: &Client, path: &Path) -> [u8; 32] {
    let done = client
        .upload_file(path, UploadOptions::default(), |_| {})
        .await
        .expect("uploads");
    chatlog_wire::client::parse_media_id(&done.media_id).expect("a media id")
}

/// A download through `client` into `out`: the bytes, or the server's refusal.
async fn download(client: &Client, sha: [u8; 32], out: &Path) -> Result<Vec<u8>, ClientError> {
    client
        .download_file(sha, out, Default::default(), |_| {})
        .await
        .map(|_| std::fs::read(out).expect("reads the download"))
}

/// Downloads `sha` through `client` until it is served, while the node answers
/// `UNAVAILABLE` (a fetch still running on a slow host); any other error fails.
async fn served(client: &Client, sha: [u8; 32], out: &Path) -> Vec<u8> {
    wait_for("the file to be served", async || {
        match download(client, sha, out).await {
            Ok(bytes) => Some(bytes),
            Err(ClientError::Server {
                code: ErrorCode::Unavailable,
                message,
                ..
            }) => {
                eprintln!("not yet: {message}");
                None
            }
            Err(e) => panic!("the download failed: {e}"),
        }
    })
    .await
}

/// Downloads `sha` through `client` until it is refused with `UNAVAILABLE` saying
/// `why` (while a fetch still runs the node says so instead); a success fails.
async fn refused_with(client: &Client, sha: [u8; 32], out: &Path, why: &str) {
    wait_for(why, async || match download(client, sha, out).await {
        Err(ClientError::Server { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Unavailable, "{message}");
            if message.contains(why) {
                eprintln!("refused as expected: {message}");
                Some(())
            } else {
                eprintln!("not yet: {message}");
                None
            }
        }
        other => panic!("a download of a bad copy must be refused, got {other:?}"),
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_was_down_fetches_what_it_missed_and_refuses_bad_copies() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster =
        tokio::task::block_in_place(|| cluster::Cluster::start(cluster::Options::default()));
    let anon = cluster::connect_with(
        &cluster.addr(1),
        cluster::client_options(None, Duration::from_secs(10), 3),
    )
    .await;
    let (alice, token) = cluster::create_and_login(&anon, "alice", "dev").await;
    let group = chatlog_raft::chat::group_of(alice);
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    let victim = cluster.ids().find(|n| *n != leader).expect("a follower");
    let other = cluster
        .ids()
        .find(|n| *n != leader && *n != victim)
        .expect("a third node");
    eprintln!("group {group}: leader {leader}, victim {victim}, other {other}");

    // The victim is down while two files are uploaded (a majority still acks parts).
    tokio::task::block_in_place(|| cluster.kill(victim));
    let uploader = connect(&cluster.addr(leader), &token, 5).await;
    let path_a = dir.path().join("a.bin");
    let a = random_file(&path_a, 4 * MEDIA_PART_BYTES as usize + 1234, seed);
    let sha_a = upload(&uploader, &path_a).await;
    let path_b = dir.path().join("b.bin");
    let b = random_file(&path_b, 3 * MEDIA_PART_BYTES as usize + 77, seed ^ 1);
    let sha_b = upload(&uploader, &path_b).await;
    assert_eq!(sha_a, <[u8; 32]>::from(Sha256::digest(&a)));
    let peers = [leader, other];
    for n in peers {
        assert!(stored(&cluster.dir(n), &sha_b).exists(), "node {n} holds b");
    }
    // Both peers' copies of b get a flipped byte in part 1: each peer's CRC check
    // refuses to serve that part.
    let flip_at = part_at(1) + 1000;
    let original = b[MEDIA_PART_BYTES as usize + 1000];
    for n in peers {
        overwrite(
            &stored(&cluster.dir(n), &sha_b),
            flip_at,
            &[original ^ 0x40],
        );
    }

    tokio::task::block_in_place(|| cluster.restart(victim));
    let victim_dir = cluster.dir(victim);

    // Background catch-up: a alone appears in the victim's store, byte-identical to the
    // leader's copy (header, content and part CRCs alike).
    let copy_a = wait_for("the restarted replica to fetch a", async || {
        std::fs::read(stored(&victim_dir, &sha_a)).ok()
    })
    .await;
    let leaders_a = std::fs::read(stored(&cluster.dir(leader), &sha_a)).expect("reads");
    assert!(copy_a == leaders_a, "the fetched file equals the peer's");
    // Served by the victim alone, byte for byte.
    let reader = connect(&cluster.addr(victim), &token, 2).await;
    let got = served(&reader, sha_a, &dir.path().join("a.out")).await;
    assert!(got == a, "the victim serves a's bytes");

    // b: every peer's part 1 fails its CRC; the victim answers UNAVAILABLE naming it,
    // and stores nothing.
    refused_with(&reader, sha_b, &dir.path().join("b.out"), "fails its CRC").await;
    assert!(!stored(&victim_dir, &sha_b).exists(), "nothing stored");

    // Part 1 forged on both peers with a matching slot: every part checks, the whole
    // does not hash to b's id. (Part 1 is the one the victim cannot hold yet: a fetch
    // has several parts in flight, so the parts around the failing one may be stored
    // already, good, from the attempts above.)
    let pb = MEDIA_PART_BYTES as usize;
    let mut forged = b[pb..2 * pb].to_vec();
    forged[5] ^= 1;
    for n in peers {
        forge_part(&stored(&cluster.dir(n), &sha_b), &b, 1, &forged);
    }
    refused_with(
        &reader,
        sha_b,
        &dir.path().join("b.out"),
        "do not make media",
    )
    .await;
    assert!(!stored(&victim_dir, &sha_b).exists(), "nothing stored");

    // Repaired on one peer only: the victim fetches from it and serves b.
    forge_part(&stored(&cluster.dir(other), &sha_b), &b, 1, &b[pb..2 * pb]);
    let got = served(&reader, sha_b, &dir.path().join("b.out")).await;
    assert!(got == b, "the victim serves b's bytes");
    let copy_b = std::fs::read(stored(&victim_dir, &sha_b)).expect("stored now");
    let others_b = std::fs::read(stored(&cluster.dir(other), &sha_b)).expect("reads");
    assert!(
        copy_b == others_b,
        "the fetched file equals the intact peer's"
    );
}

/// Runs `chatlog admin ARGS --json`; Ok(JSON) on success, Err(stderr) on failure.
fn admin(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .arg("admin")
        .args(args)
        .arg("--json")
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .output()
        .expect("chatlog admin runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_to_a_new_node_brings_the_groups_media() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = tokio::task::block_in_place(|| {
        cluster::Cluster::start(cluster::Options {
            http: true,
            ..cluster::Options::default()
        })
    });
    let anon = cluster::connect_with(
        &cluster.addr(1),
        cluster::client_options(None, Duration::from_secs(10), 3),
    )
    .await;
    let (alice, token) = cluster::create_and_login(&anon, "alice", "dev").await;
    let group = chatlog_raft::chat::group_of(alice);
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    let client = connect(&cluster.addr(leader), &token, 5).await;
    let path = dir.path().join("m.bin");
    let data = random_file(&path, 2 * MEDIA_PART_BYTES as usize + 99, seed);
    let sha = upload(&client, &path).await;

    let four = tokio::task::block_in_place(|| cluster.join(1));
    let from = cluster
        .ids()
        .find(|n| *n != leader && *n != four)
        .expect("a follower");
    let http = cluster.http_addr(2);
    let moved = wait_for("the replica move", async || {
        match admin(&[
            "replica",
            "move",
            "--server",
            &http,
            "--group",
            &group.to_string(),
            "--from",
            &from.to_string(),
            "--to",
            &four.to_string(),
        ]) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("replica move: {e}; retrying");
                None
            }
        }
    })
    .await;
    assert_eq!(moved["done"], true, "{moved}");
    eprintln!("group {group} moved from node {from} to node {four}");
    let copy = wait_for("the new replica to fetch the group's media", async || {
        std::fs::read(stored(&cluster.dir(four), &sha)).ok()
    })
    .await;
    let leaders = std::fs::read(stored(&cluster.dir(leader), &sha)).expect("reads");
    assert!(
        copy == leaders,
        "the new replica's file equals the leader's"
    );
    let reader = connect(&cluster.addr(four), &token, 5).await;
    let got = served(&reader, sha, &dir.path().join("m.out")).await;
    assert!(got == data, "byte for byte");

    // Uploads after the move replicate to the group's replicas as the move left them:
    // the new node holds the file as soon as the upload finished (the finish waits for
    // the replicas' answers), before any catch-up scan could have brought it.
    let path2 = dir.path().join("m2.bin");
    let data2 = random_file(&path2, MEDIA_PART_BYTES as usize + 5, seed ^ 2);
    let sha2 = upload(&client, &path2).await;
    let copy2 = std::fs::read(stored(&cluster.dir(four), &sha2)).expect("on the new replica");
    assert!(
        copy2 == std::fs::read(stored(&cluster.dir(leader), &sha2)).expect("on the leader"),
        "the same file"
    );
    let got = served(&reader, sha2, &dir.path().join("m2.out")).await;
    assert!(got == data2, "byte for byte");
}
