//! Black-box: `chatlog serve --io-backend` forces the storage engine's I/O backend (issue
//! 2: "the choice is made at open, can be forced by configuration, and is reported"), the
//! backend in use is reported in `/metrics` and `/admin/status`, and a value the flag does
//! not know is refused before anything starts.

#[path = "common/server.rs"]
mod server;

use std::process::Command;
use std::time::Duration;

use server::Server;

const CALL: Duration = Duration::from_secs(20);
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_syscall_backend_is_used_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        &["--http", "127.0.0.1:0", "--io-backend", "syscall"],
    );
    server.wait_ready(WAIT).await;
    let metrics = server.http_get("/metrics", CALL).await;
    let info = metrics
        .lines()
        .find(|l| l.starts_with("chatlog_node_info{"))
        .unwrap_or_else(|| panic!("no chatlog_node_info in /metrics:\n{metrics}"));
    assert!(
        info.contains("io_backend=\"Syscall\""),
        "forced syscall backend not reported: {info}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&server.http_get("/admin/status", CALL).await).expect("status JSON");
    let text = status.to_string();
    assert!(
        text.contains("\"io_backend\":\"Syscall\""),
        "forced syscall backend not in /admin/status: {text}"
    );
}

#[test]
fn an_unknown_backend_is_refused_before_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(["serve", "--io-backend", "aio", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run chatlog");
    assert_eq!(out.status.code(), Some(2), "clap refuses with exit code 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--io-backend") && err.contains("syscall"),
        "the refusal names the flag and its values: {err}"
    );
    assert!(!data.exists(), "nothing was created for a refused start");
}
