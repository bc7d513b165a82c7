//! Black-box: the media fast paths of session 7 against a real `chatlog serve` process on
//! 127.0.0.1, through the client library.
//!
//! Covered: an upload whose SHA-256 the client knows up front (`UploadOptions::sha256`:
//! the client does not hash, the server still does and checks it at finish), sent as
//! split frames (each part's bytes written from their own buffer after the frame's head)
//! with 32 parts in flight; the same file again with its hash known: answered from
//! `media_upload_start` without a part sent, nothing new on disk; a wrong known hash:
//! refused at finish with BAD_REQUEST and nothing left visible; and downloads of the
//! stored file matching byte for byte, whole and ranged, with every chunk's CRC and the
//! whole SHA-256 checked by the client.

use std::path::{Path, PathBuf};

use chatlog_wire::client::{
    Client, ClientError, ClientOptions, DownloadCheck, DownloadOptions, UPLOAD_PARTS_IN_FLIGHT_MAX,
    UploadOptions, media_id_hex,
};
use chatlog_wire::limits::MEDIA_PART_BYTES;
use chatlog_wire::proto::v1::{self, ErrorCode};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

#[path = "common/server.rs"]
mod server;

use server::Server;

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

async fn user(addr: &str, name: &str) -> Client {
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
    Client::connect(
        addr,
        ClientOptions {
            token: Some(login.session_token),
            ..ClientOptions::default()
        },
    )
    .await
    .expect("connects with the token")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_hash_upload_is_checked_by_the_server_and_dedupes_from_the_start() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let server = Server::start(&data_dir, &[]);
    let alice = user(&server.addr, "alice").await;

    // 40 parts and a short last one: more parts than fit in flight at once.
    let file = dir.path().join("video.bin");
    let data = random_file(&file, 40 * MEDIA_PART_BYTES as usize + 777, seed);
    let sha: [u8; 32] = Sha256::digest(&data).into();

    let mut acked = 0;
    let first = alice
        .upload_file(
            &file,
            UploadOptions {
                sha256: Some(sha),
                parts_in_flight: UPLOAD_PARTS_IN_FLIGHT_MAX,
                ..Default::default()
            },
            |p| acked = p.bytes_done,
        )
        .await
        .expect("uploads");
    assert_eq!(acked, data.len() as u64, "every part acknowledged");
    assert!(!first.deduplicated);
    assert_eq!(first.media_id, media_id_hex(&sha));
    assert_eq!(files_in(&data_dir.join("media/files")).len(), 1);

    // The same bytes again, hash known: the start answers with the stored file, and no
    // part is sent (no upload id is ever reported).
    let mut reported_upload = false;
    let again = alice
        .upload_file(
            &file,
            UploadOptions {
                sha256: Some(sha),
                ..Default::default()
            },
            |p| reported_upload |= p.upload_id != 0,
        )
        .await
        .expect("dedupes");
    assert!(again.deduplicated);
    assert_eq!(again.media_id, first.media_id);
    assert!(!reported_upload, "nothing was uploaded");
    assert_eq!(files_in(&data_dir.join("media/files")).len(), 1);
    assert!(files_in(&data_dir.join("media/uploads")).is_empty());

    // A wrong known hash (other bytes, this file's size): the server hashes what it got
    // and refuses at finish; nothing is stored, nothing left in progress.
    let other = dir.path().join("other.bin");
    let other_data = random_file(&other, 3 * MEDIA_PART_BYTES as usize, seed ^ 1);
    let wrong: [u8; 32] = Sha256::digest(b"not these bytes").into();
    let refused = alice
        .upload_file(
            &other,
            UploadOptions {
                sha256: Some(wrong),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .expect_err("a wrong hash is refused");
    assert!(
        matches!(
            refused,
            ClientError::Server {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{refused}"
    );
    assert_eq!(files_in(&data_dir.join("media/files")).len(), 1);
    assert!(files_in(&data_dir.join("media/uploads")).is_empty());
    let right: [u8; 32] = Sha256::digest(&other_data).into();
    let missing = alice
        .media_info(v1::MediaInfoRequest {
            sha256: bytes::Bytes::copy_from_slice(&right),
        })
        .await
        .expect_err("never stored");
    assert!(matches!(
        missing,
        ClientError::Server {
            code: ErrorCode::NotFound,
            ..
        }
    ));

    // Downloads of the stored file (in the page cache: just written): whole, checked,
    // byte for byte; and ranges that are whole parts, parts of parts and across parts.
    let out = dir.path().join("out.bin");
    let n = alice
        .download_file(sha, &out, DownloadOptions::default(), |_| {})
        .await
        .expect("downloads");
    assert_eq!(n, data.len() as u64);
    assert!(std::fs::read(&out).expect("reads") == data, "same bytes");
    for check in [DownloadCheck::PartCrcs, DownloadCheck::Sha256] {
        assert_eq!(
            alice
                .download_checked(sha, 0, check, |_| {})
                .await
                .expect("checked"),
            data.len() as u64,
            "{check:?}"
        );
    }
    let pb = u64::from(MEDIA_PART_BYTES);
    for (offset, length) in [
        (0, MEDIA_PART_BYTES),
        (39 * pb, MEDIA_PART_BYTES),
        (40 * pb, MEDIA_PART_BYTES),
        (pb - 10, 20),
        (5, 1000),
    ] {
        let got = alice
            .media_download(v1::MediaDownloadRequest {
                sha256: bytes::Bytes::copy_from_slice(&sha),
                offset,
                length,
            })
            .await
            .expect("a range");
        let end = (offset + u64::from(length)).min(data.len() as u64) as usize;
        assert!(
            got.data[..] == data[offset as usize..end],
            "range {offset}+{length}"
        );
        assert_eq!(
            got.crc32,
            crc32fast::hash(&got.data),
            "range {offset}+{length}"
        );
    }
}
