//! Black-box: what `chatlog download` checks, against a real `chatlog serve` process on
//! 127.0.0.1 and its real files.
//!
//! Covered: a download checked by its chunks' stored CRC-32s alone (the default) and with
//! `--verify-sha256` both return the uploaded bytes; a byte flipped in the stored file on
//! the server's disk makes both fail (the server's check of the part refuses it) and
//! nothing is renamed into place; a part whose bytes and stored CRC were both rewritten
//! (a forged part, which no CRC can catch) is refused by `--verify-sha256`; and a damaged
//! `FILE.part` left by an interrupted download is found by the SHA-256 that a resumed
//! download always checks, and removed.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::limits::MEDIA_PART_BYTES;
use rand::{RngCore, SeedableRng};
use serde_json::Value;

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/server.rs"]
mod server;

use server::Server;

const BIN: &str = env!("CARGO_BIN_EXE_chatlog");

/// Bytes of a stored media file's header, before its content (`src/media/store.rs`).
const HEADER_BYTES: u64 = 4096;
/// Bytes of one part slot in a stored media file.
const SLOT_BYTES: u64 = 16;
/// The salt of a slot's own CRC (`src/media/store.rs`).
const SLOT_CRC_SALT: u32 = 0x4d45_4431;

/// A new user's session token.
async fn token(addr: &str, name: &str) -> String {
    let anon = Client::connect(addr, ClientOptions::default())
        .await
        .expect("connects");
    cluster::create_and_login(&anon, name, "test").await.1
}

fn chatlog(addr: &str, token: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--server", addr, "--token", token, "--json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("chatlog runs")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "chatlog failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prints JSON")
}

/// Runs `chatlog download MEDIA_ID -o OUTPUT EXTRA…`.
fn download(addr: &str, token: &str, media_id: &str, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["download", media_id, "-o", output.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    chatlog(addr, token, &args)
}

fn part_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// The stored CRC slot of part `part` of a file of `size` bytes, as the store writes it.
fn slot(part: u32, crc: u32) -> [u8; SLOT_BYTES as usize] {
    let mut s = [0u8; SLOT_BYTES as usize];
    s[..4].copy_from_slice(&crc.to_le_bytes());
    s[4..8].copy_from_slice(&part.to_le_bytes());
    let check = crc32fast::hash(&s[..8]) ^ SLOT_CRC_SALT;
    s[8..12].copy_from_slice(&check.to_le_bytes());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_detects_damaged_stored_files_forged_parts_and_damaged_partial_files() {
    let seed = cluster::seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let server = Server::start(&data_dir, &[]);
    let addr = server.addr.clone();
    let alice = token(&addr, "alice").await;

    // Five whole parts and a short sixth one.
    let pb = MEDIA_PART_BYTES as usize;
    let mut data = vec![0u8; 5 * pb + 4321];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let input = dir.path().join("clip.bin");
    std::fs::write(&input, &data).expect("writes");
    let up = json_of(&chatlog(
        &addr,
        &alice,
        &["upload", input.to_str().expect("utf-8")],
    ));
    let media_id = up["media_id"].as_str().expect("media id").to_string();
    let stored = data_dir.join("media/files").join(&media_id);
    assert!(stored.exists(), "stored as {}", stored.display());

    // 1. Intact: both checks give the same bytes back.
    for (name, extra) in [("crc.bin", &[][..]), ("sha.bin", &["--verify-sha256"][..])] {
        let output = dir.path().join(name);
        let out = json_of(&download(&addr, &alice, &media_id, &output, extra));
        assert_eq!(out["size_bytes"].as_u64(), Some(data.len() as u64));
        assert!(
            std::fs::read(&output).expect("reads") == data,
            "{name} differs"
        );
    }

    // 2. A byte of part 3 flipped on the server's disk: the server's check of that part
    //    refuses to serve it, so both downloads fail and no output appears.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&stored)
        .expect("opens the stored file");
    let at = HEADER_BYTES + 3 * pb as u64 + 17;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).expect("reads");
    file.write_all_at(&[byte[0] ^ 0x40], at).expect("flips");
    for (name, extra) in [
        ("crc-bad.bin", &[][..]),
        ("sha-bad.bin", &["--verify-sha256"][..]),
    ] {
        let output = dir.path().join(name);
        let out = download(&addr, &alice, &media_id, &output, extra);
        assert!(!out.status.success(), "{name}: a damaged part was served");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("part 3") && stderr.contains("CRC"),
            "{name}: the error names the damaged part: {stderr}"
        );
        assert!(!output.exists(), "{name}: a failed download is not renamed");
    }

    // 3. The same flip with the part's stored CRC rewritten to match (forged, as a bug
    //    or someone with the disk could): no CRC can tell, the SHA-256 does.
    let mut part3 = vec![0u8; pb];
    file.read_exact_at(&mut part3, HEADER_BYTES + 3 * pb as u64)
        .expect("reads part 3");
    let slots = HEADER_BYTES + (data.len() as u64).next_multiple_of(4096);
    file.write_all_at(&slot(3, crc32fast::hash(&part3)), slots + 3 * SLOT_BYTES)
        .expect("rewrites the slot");
    let output = dir.path().join("forged.bin");
    let out = download(&addr, &alice, &media_id, &output, &["--verify-sha256"]);
    assert!(
        !out.status.success(),
        "a forged part passed --verify-sha256"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not hash"), "{stderr}");
    assert!(!output.exists(), "a failed download is not renamed");
    assert!(
        !part_path(&output).exists(),
        "a file that fails the hash cannot be resumed: removed"
    );

    // Repaired (the original byte and slot back): served again.
    file.write_all_at(&byte, at).expect("restores the byte");
    let crc = crc32fast::hash(&data[3 * pb..4 * pb]);
    file.write_all_at(&slot(3, crc), slots + 3 * SLOT_BYTES)
        .expect("restores the slot");
    drop(file);

    // 4. A partial download left behind (two whole chunks) with a damaged byte: the
    //    resume keeps those bytes, and checks them with the whole file's SHA-256 even
    //    without --verify-sha256; the damaged partial file is reported and removed, and
    //    the next run downloads from the start and succeeds.
    let output = dir.path().join("resumed.bin");
    let mut partial = data[..2 * pb].to_vec();
    partial[pb + 5] ^= 1;
    std::fs::write(part_path(&output), &partial).expect("writes the partial file");
    let out = download(&addr, &alice, &media_id, &output, &[]);
    assert!(!out.status.success(), "a damaged partial file was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not hash"), "{stderr}");
    assert!(!output.exists());
    assert!(
        !part_path(&output).exists(),
        "the damaged partial is removed"
    );
    let out = json_of(&download(&addr, &alice, &media_id, &output, &[]));
    assert_eq!(out["resumed_from"].as_u64(), Some(0));
    assert!(std::fs::read(&output).expect("reads") == data);

    // An intact partial file resumes (from its whole chunks) and ends byte for byte.
    let output = dir.path().join("resumed-ok.bin");
    std::fs::write(part_path(&output), &data[..2 * pb + 100]).expect("writes");
    let out = json_of(&download(&addr, &alice, &media_id, &output, &[]));
    assert_eq!(out["resumed_from"].as_u64(), Some(2 * pb as u64));
    assert!(std::fs::read(&output).expect("reads") == data);
    drop(server);
}
