//! Black-box: the log lines of a request's path carry its connection and request ids,
//! in JSON (`--log-json`) as the fields of the `request` span, so an operator can follow
//! one request through the log of a node.
//!
//! A real `chatlog serve` with `--log-json` and debug logging of the gateway; a client
//! sends a request that is answered and one that is refused, with request ids the test
//! knows; the process's stderr is read for the lines of exactly those requests.

#[path = "common/cluster.rs"]
mod cluster;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chatlog_wire::proto::v1::{self, request};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_request_carries_its_connection_and_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args([
            "--log-json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--groups",
            "2",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn,chatlog::gateway=debug")
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chatlog serve starts");
    let stdout = child.stdout.take().unwrap();
    let addr = BufReader::new(stdout)
        .lines()
        .map(|l| l.expect("stdout"))
        .find_map(|l| l.strip_prefix("clients: ").map(|a| a.trim().to_string()))
        .expect("the server announces its address");
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let client = cluster::connect_with(
        &addr,
        cluster::client_options(None, Duration::from_secs(10), 1),
    )
    .await;
    cluster::create_and_login(&client, "ann", "phone").await;
    // One answered request and one refused, each on its own request id.
    client
        .call(request::Kind::ListChats(v1::ListChatsRequest {
            after_chat_id: 0,
            limit: 10,
        }))
        .await
        .expect("list chats");
    let refused = client
        .call(request::Kind::History(v1::HistoryRequest {
            chat_id: 999_999,
            from_seq: 1,
            direction: v1::Direction::Forward as i32,
            limit: 10,
        }))
        .await;
    assert!(refused.is_err(), "history of no chat: {refused:?}");
    // A post, which the gateway polls on the connection's task instead of a task of its
    // own (`Service::runs_inline`): its lines carry the same span.
    let refused_post = client
        .call(request::Kind::SendMessage(v1::SendMessageRequest {
            chat_id: 999_999,
            client_message_id: 1,
            text: "hello".into(),
            ..Default::default()
        }))
        .await;
    assert!(refused_post.is_err(), "a post to no chat: {refused_post:?}");

    // Collect the request lines for a while; every one must name its ids, and both an
    // answered and a refused request must be there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut answered, mut refused_lines) = (Vec::new(), Vec::new());
    while Instant::now() < deadline && (answered.is_empty() || refused_lines.len() < 2) {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            panic!("a log line that is not JSON under --log-json: {line}");
        };
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        if !message.starts_with("request ") {
            continue;
        }
        let span = &v["span"];
        assert_eq!(span["name"], "request", "{line}");
        assert!(span["connection"].as_u64().is_some(), "{line}");
        assert!(span["request"].as_u64().is_some_and(|r| r > 0), "{line}");
        if message == "request answered" {
            answered.push(v);
        } else if message.starts_with("request refused") {
            refused_lines.push(v);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!answered.is_empty(), "no 'request answered' line");
    assert!(
        refused_lines.len() >= 2,
        "not both 'request refused' lines (history, post): {refused_lines:?}"
    );
    // The refused history and the answered requests are different requests of one
    // connection.
    let conn = refused_lines[0]["span"]["connection"].clone();
    assert!(
        answered.iter().any(|a| a["span"]["connection"] == conn
            && a["span"]["request"] != refused_lines[0]["span"]["request"]),
        "answered {answered:?}, refused {refused_lines:?}"
    );
}
