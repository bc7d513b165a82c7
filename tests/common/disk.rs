//! Looking for bytes on disk: what a test that proves erasure (secret chats, deleted
//! messages) scans a node's data directory with, and the compaction that removes them.
//!
//! Included with `#[path = "common/disk.rs"] mod disk;` by the tests that need it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use chatlog::http::client::request;
use serde_json::Value;

/// The first file under `dir` (recursively, raw bytes) that contains `needle`.
pub fn disk_contains(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    assert!(
        needle.len() >= 8,
        "a needle this short could match by chance"
    );
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            // A file removed between the listing and the read (compaction) holds nothing.
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return Some(path);
            }
        }
    }
    None
}

/// `POST /admin/compact` on the node at `http`: its answer, after checking that no
/// erasure was pending.
pub async fn compact(http: &str) -> Value {
    let r = request(
        http,
        "POST",
        "/admin/compact",
        None,
        Some(b"{}"),
        Duration::from_secs(20),
    )
    .await
    .expect("compact answers");
    assert_eq!(
        r.status,
        200,
        "compact: {}",
        String::from_utf8_lossy(&r.body)
    );
    let v: Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["erasures_pending"], false, "{v}");
    v
}
