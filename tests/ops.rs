//! Black-box: the HTTP port of real `chatlog serve` processes on 127.0.0.1 (`--http`)
//! and the `chatlog admin` commands against it.
//!
//! Covered: `/health`; `/ready` once every group has a leader; `/metrics` is valid
//! Prometheus text (HELP and TYPE for every family, every sample `name{labels} value`)
//! whose counters move after client traffic; `admin status --json` lists every local
//! group with its leader; the admin token (none, wrong, right); bad input and unknown
//! groups; and in a 3-node cluster, every node's `status` agreeing on the leaders and
//! `admin leader-transfer` moving a group's leader, seen by every node's `status`.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it.

#[path = "common/cluster.rs"]
mod cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chatlog::http::client::{HttpResponse, request};
use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options};
use serde_json::Value;

/// Longest a node may take to announce its addresses.
const START_WAIT: Duration = Duration::from_secs(30);
/// Longest anything needing an election may take.
const WAIT: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(20);

struct Server {
    child: Child,
    clients: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `chatlog serve` with `extra` flags; returns once it printed both addresses.
fn start(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatlog"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("chatlog serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining, so the process never blocks on stdout.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut clients, mut http) = (None, None);
    let deadline = Instant::now() + START_WAIT;
    while clients.is_none() || http.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the server announces its addresses in time");
        if let Some(a) = line.strip_prefix("clients: ") {
            clients = Some(a.trim().to_string());
        } else if let Some(a) = line.strip_prefix("http: ") {
            http = Some(a.trim().to_string());
        }
    }
    Server {
        child,
        clients: clients.expect("clients"),
        http: http.expect("http"),
    }
}

async fn get(addr: &str, path: &str, token: Option<&str>) -> HttpResponse {
    request(addr, "GET", path, token, None, CALL)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn post(addr: &str, path: &str, body: &str) -> HttpResponse {
    request(addr, "POST", path, None, Some(body.as_bytes()), CALL)
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Runs `chatlog admin ARGS`; (exit success, stdout, stderr).
fn admin(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatlog"));
    cmd.arg("admin")
        .args(args)
        .env_remove("CHATLOG_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("chatlog admin runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(http: &str) -> Value {
    let (ok, out, err) = admin(&["status", "--server", http, "--json"], &[]);
    assert!(ok, "admin status failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is JSON ({e}): {out}"))
}

/// Group id → leader, from a status.
fn leaders(status: &Value) -> BTreeMap<u64, Option<u64>> {
    status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| (g["id"].as_u64().expect("id"), g["leader"].as_u64()))
        .collect()
}

/// Polls `/ready` until 200.
async fn wait_ready(http: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = get(http, "/ready", None).await;
        if r.status == 200 {
            return;
        }
        assert_eq!(r.status, 503, "ready answers 200 or 503: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).expect("503 body is JSON");
        assert!(v["groups_without_leader"].is_array(), "{v}");
        assert!(Instant::now() < deadline, "not ready in time: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the exposition format and returns every sample as `name{labels}` → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut help = BTreeSet::new();
    let mut typed = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').expect("HELP name text");
            assert!(!text.is_empty(), "HELP of {name} has text");
            help.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "TYPE of {name}: {kind}"
            );
            if kind == "histogram" {
                histograms.insert(name.to_string());
            }
            assert!(help.contains(name), "HELP before TYPE for {name}");
            typed.insert(name.to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let name = series.split('{').next().expect("name");
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "metric name {name:?}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels of {line:?}"));
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').expect("label k=v");
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(
                    v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "{line}"
                );
            }
        }
        // A histogram's samples are its family name plus `_bucket`, `_sum` or `_count`.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|f| histograms.contains(*f))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "{line}"
        );
    }
    samples
}

async fn metrics(http: &str) -> BTreeMap<String, f64> {
    let r = get(http, "/metrics", None).await;
    assert_eq!(r.status, 200);
    parse_metrics(&r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_http_port_health_ready_metrics_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(dir.path(), &["--groups", "4"], &[]);
    let http = server.http.clone();

    let r = get(&http, "/health", None).await;
    assert_eq!((r.status, r.text().trim()), (200, "ok"));
    wait_ready(&http).await;

    let before = metrics(&http).await;
    for name in [
        "chatlog_storage_bytes_written_total",
        "chatlog_storage_syncs_total",
        "chatlog_client_requests_total",
        "chatlog_client_connections",
        "chatlog_group_term{group=\"1\"}",
        "chatlog_group_leader{group=\"1\"}",
        "chatlog_group_committed_index{group=\"1\"}",
        "chatlog_group_applied_index{group=\"1\"}",
        "chatlog_group_leader_changes_total{group=\"1\"}",
    ] {
        assert!(before.contains_key(name), "{name} in /metrics");
    }
    assert_eq!(before["chatlog_group_leader{group=\"1\"}"], 1.0);

    // Some client traffic: a user, a login, a chat, messages.
    let options = ClientOptions {
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let c = Client::connect(&server.clients, options.clone())
        .await
        .expect("connects");
    let created = c
        .create_user(v1::CreateUserRequest { name: "ops".into() })
        .await
        .expect("user");
    let login = c
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: "d".into(),
            device_name: "d".into(),
        })
        .await
        .expect("login");
    let c = Client::connect(
        &server.clients,
        ClientOptions {
            token: Some(login.session_token),
            ..options
        },
    )
    .await
    .expect("connects with a session");
    let chat = c
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "ops".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat")
        .chat_id;
    for i in 0..5 {
        c.send_message(v1::SendMessageRequest {
            chat_id: chat,
            client_message_id: i + 1,
            text: format!("m{i}"),
            media: None,
            reply_to_seq: 0,
        })
        .await
        .expect("sent");
    }

    let after = metrics(&http).await;
    for name in [
        "chatlog_storage_bytes_written_total",
        "chatlog_storage_syncs_total",
        "chatlog_client_connections_total",
    ] {
        assert!(after[name] > before[name], "{name} grew");
    }
    assert!(
        after["chatlog_client_requests_total"] >= before["chatlog_client_requests_total"] + 8.0,
        "requests counted"
    );
    assert!(after["chatlog_client_connections"] >= 1.0);
    let committed = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with("chatlog_group_committed_index{"))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        committed(&after) >= committed(&before) + 5.0,
        "commits moved"
    );

    // admin status: every local group (4 + the controller group) with its leader.
    let status = status_json(&http);
    let groups = leaders(&status);
    assert_eq!(groups.len(), 5, "{status}");
    assert!(groups.values().all(|l| *l == Some(1)), "{status}");
    assert_eq!(status["node"]["id"], 1);
    assert_eq!(status["node"]["clients_addr"], server.clients.as_str());
    assert!(
        status["summary"]
            .as_str()
            .expect("summary")
            .contains("all with a leader")
    );
    let (ok, human, err) = admin(&["status", "--server", &http], &[]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = human.lines().collect();
    assert!(lines[0].starts_with("node 1: 5 groups"), "{human}");
    assert!(lines[1].starts_with("GROUP"), "{human}");
    // The summary, the header, one row per group, the nodes and this node's disk, then
    // the placement line.
    assert_eq!(lines.len(), 2 + 5 + 2 + 1, "{human}");
    assert!(lines[7].starts_with("nodes: 1 up"), "{human}");
    assert!(lines[8].starts_with("disk of node 1: data dir "), "{human}");
    assert!(lines[9].starts_with("placement v"), "{human}");

    // Bad input, unknown group, unknown path, transfer to the leader itself.
    let r = post(&http, "/admin/leader-transfer", "{\"group\": 1}").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).expect("JSON error");
    assert_eq!(v["code"], "BAD_REQUEST");
    let r = post(
        &http,
        "/admin/leader-transfer",
        "{\"group\": 99, \"to\": 1}",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(&http, "/admin/leader-transfer", "{\"group\": 1, \"to\": 7}").await;
    assert_eq!(r.status, 400, "not a voter: {}", r.text());
    assert_eq!(get(&http, "/nope", None).await.status, 404);
    let (ok, out, err) = admin(
        &[
            "leader-transfer",
            "--server",
            &http,
            "--group",
            "1",
            "--to",
            "1",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("already leads"), "{out}");
    let (ok, _, err) = admin(
        &[
            "leader-transfer",
            "--server",
            &http,
            "--group",
            "99",
            "--to",
            "1",
        ],
        &[],
    );
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_admin_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start(
        dir.path(),
        &["--groups", "2"],
        &[("CHATLOG_ADMIN_TOKEN", "secret")],
    );
    let http = server.http.clone();
    wait_ready(&http).await;
    // Open endpoints stay open.
    assert_eq!(get(&http, "/health", None).await.status, 200);
    assert_eq!(get(&http, "/metrics", None).await.status, 200);

    let r = get(&http, "/admin/status", None).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).expect("JSON error");
    assert_eq!(v["code"], "UNAUTHENTICATED");
    assert_eq!(get(&http, "/admin/status", Some("wrong")).await.status, 401);
    assert_eq!(get(&http, "/admin/status", Some("secre")).await.status, 401);
    let r = get(&http, "/admin/status", Some("secret")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        &http,
        "POST",
        "/admin/leader-transfer",
        None,
        Some(b"{\"group\": 1, \"to\": 1}"),
        CALL,
    )
    .await
    .expect("answers");
    assert_eq!(r.status, 401, "transfer needs the token too");
    // s8retention: the retention policy endpoints too; a bad body is a typed 400.
    assert_eq!(get(&http, "/admin/retention", None).await.status, 401);
    let set = |token: Option<&'static str>, body: &'static [u8]| {
        let http = http.clone();
        async move {
            request(&http, "POST", "/admin/retention", token, Some(body), CALL)
                .await
                .expect("answers")
        }
    };
    assert_eq!(set(None, b"{\"entries\": 10}").await.status, 401);
    let r = set(Some("secret"), b"{\"entries\": 0}").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("at least 1"), "{}", r.text());
    let r = set(Some("secret"), b"{\"entries\": \"ten\"}").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = set(Some("secret"), b"{\"entries\": 1000, \"bytes\": null}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["groups"].as_array().map(Vec::len), Some(3), "{v}");
    let r = get(&http, "/admin/retention", Some("secret")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).expect("JSON");
    for g in v["groups"].as_array().expect("groups") {
        assert_eq!(g["policy"]["entries"], 1000, "{g}");
        assert_eq!(g["state_digest"].as_str().map(str::len), Some(16), "{g}");
    }

    let (ok, _, err) = admin(&["status", "--server", &http], &[]);
    assert!(!ok && err.contains("UNAUTHENTICATED"), "{err}");
    let (ok, _, err) = admin(&["status", "--server", &http, "--admin-token", "nope"], &[]);
    assert!(!ok && err.contains("UNAUTHENTICATED"), "{err}");
    let (ok, out, err) = admin(
        &["status", "--server", &http, "--json"],
        &[("CHATLOG_ADMIN_TOKEN", "secret")],
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(leaders(&v).len(), 3);
}

#[test]
fn a_busy_http_address_stops_startup() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            &addr,
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP address") && err.contains(&addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_agrees_and_leader_transfer_moves_a_leader() {
    let options = Options {
        groups: 2,
        http: true,
        ..Options::default()
    };
    let cluster = tokio::task::block_in_place(|| Cluster::start(options));
    let http: Vec<String> = cluster.ids().map(|id| cluster.http_addr(id)).collect();
    for h in &http {
        wait_ready(h).await;
    }

    // Every node reports the same leader for every group.
    let deadline = Instant::now() + WAIT;
    let agreed = loop {
        let all: Vec<BTreeMap<u64, Option<u64>>> =
            http.iter().map(|h| leaders(&status_json(h))).collect();
        if all[0].len() == 3
            && all.iter().all(|l| *l == all[0])
            && all[0].values().all(Option::is_some)
        {
            break all[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "nodes disagree on leaders: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = status_json(&http[0]);
    assert_eq!(
        status["nodes"].as_array().expect("nodes").len(),
        3,
        "{status}"
    );

    // Move group 1's leader to another node.
    let g = 1u64;
    let from = agreed[&g].expect("leader");
    let to = if from == 3 { 1 } else { from + 1 };
    let other = (1..=3u64)
        .find(|n| *n != from && *n != to)
        .expect("third node");
    // The leader's status shows its followers and their lag.
    let leader_status = status_json(&http[(from - 1) as usize]);
    let group = leader_status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|x| x["id"] == g)
        .expect("group")
        .clone();
    assert_eq!(group["role"], "leader");
    assert_eq!(
        group["followers"].as_array().expect("followers").len(),
        2,
        "{group}"
    );

    // A node that does not lead the group refuses, naming the leader.
    let (ok, _, err) = admin(
        &[
            "leader-transfer",
            "--server",
            &http[(other - 1) as usize],
            "--group",
            &g.to_string(),
            "--to",
            &to.to_string(),
        ],
        &[],
    );
    assert!(
        !ok && err.contains("NOT_LEADER") && err.contains(&format!("node {from} does")),
        "{err}"
    );

    let (ok, out, err) = admin(
        &[
            "leader-transfer",
            "--server",
            &http[(from - 1) as usize],
            "--group",
            &g.to_string(),
            "--to",
            &to.to_string(),
            "--json",
        ],
        &[],
    );
    assert!(ok, "transfer failed: {err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["leader"], to, "{v}");
    assert_eq!(v["moved"], true, "{v}");

    // Every node's status shows the new leader.
    let deadline = Instant::now() + WAIT;
    loop {
        let all: Vec<Option<u64>> = http.iter().map(|h| leaders(&status_json(h))[&g]).collect();
        if all.iter().all(|l| *l == Some(to)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leader of group {g} on each node: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics(&http[(to - 1) as usize]).await;
    assert_eq!(m[&format!("chatlog_group_is_leader{{group=\"{g}\"}}")], 1.0);
    assert!(m[&format!("chatlog_group_leader_changes_total{{group=\"{g}\"}}")] >= 2.0);
    assert!(
        m.contains_key(&format!(
            "chatlog_group_follower_lag_entries{{group=\"{g}\",follower=\"{from}\"}}"
        )),
        "the new leader reports its followers' lag"
    );
}
