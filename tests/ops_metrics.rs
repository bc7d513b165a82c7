//! Black-box: issue 7's metrics and sizes on a real `chatlog serve` process: the latency
//! histograms of `/metrics` (append and fdatasync per node, commit per group) are valid
//! Prometheus histograms that move with traffic; entries written, rate-limit refusals and
//! pushes are counted; and each group's size on disk in `status` (JSON and the CLI's
//! table) grows with the bytes written to it and stays within the segment bytes.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it.

#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use chatlog::http::client::request;
use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::proto::v1;
use serde_json::Value;
use server::Server;

const WAIT: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(20);
/// Messages sent, and the bytes of each one's text (random letters: LZ4 cannot shrink
/// them, so the bytes on disk follow the bytes sent).
const MESSAGES: u64 = 30;
const TEXT_BYTES: usize = 8 * 1024;

async fn get(http: &str, path: &str) -> String {
    let r = request(http, "GET", path, None, None, CALL)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.text()
}

/// Every sample as `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// Checks histogram `name` with `labels` (`group="3"` or empty) the way Prometheus reads
/// it: `# TYPE name histogram`, buckets with rising `le` and non-decreasing counts, `+Inf`
/// equal to `_count`, a `_sum`. Returns (count, sum).
fn histogram(text: &str, name: &str, labels: &str) -> (f64, f64) {
    assert!(
        text.contains(&format!("# TYPE {name} histogram\n")),
        "{name} is typed as a histogram"
    );
    let prefix = if labels.is_empty() {
        format!("{name}_bucket{{le=\"")
    } else {
        format!("{name}_bucket{{{labels},le=\"")
    };
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&prefix) {
            let (le, value) = rest.split_once("\"} ").expect("le\"} value");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a number")
            };
            buckets.push((le, value.parse().expect("count")));
        }
    }
    assert!(buckets.len() >= 2, "{name}{{{labels}}} has buckets");
    for w in buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "{name}: le rises: {buckets:?}");
        assert!(
            w[0].1 <= w[1].1,
            "{name}: buckets are cumulative: {buckets:?}"
        );
    }
    let (last_le, inf) = *buckets.last().expect("a bucket");
    assert!(last_le.is_infinite(), "{name}: the last bucket is +Inf");
    let series = |suffix: &str| {
        if labels.is_empty() {
            format!("{name}_{suffix}")
        } else {
            format!("{name}_{suffix}{{{labels}}}")
        }
    };
    let s = samples(text);
    let count = s[&series("count")];
    let sum = s[&series("sum")];
    assert_eq!(inf, count, "{name}: +Inf equals _count");
    (count, sum)
}

/// Random letters (xorshift; the seed is printed).
fn text(seed: &mut u64) -> String {
    (0..TEXT_BYTES)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (b'a' + (*seed % 26) as u8) as char
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histograms_counters_and_group_disk_sizes_move_with_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A low per-user send rate, so some sends are refused (the client repeats them).
    let server = Server::start(
        &dir.path().join("data"),
        &["--http", "127.0.0.1:0", "--user-sends-per-sec", "5"],
    );
    let http = server.http.clone().expect("http");
    server.wait_ready(WAIT).await;
    let status = |http: String| async move {
        serde_json::from_str::<Value>(&get(&http, "/admin/status").await).expect("JSON")
    };
    let disk_of = |s: &Value| -> BTreeMap<u64, u64> {
        s["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .map(|g| {
                let bytes = g["disk_bytes"].as_u64();
                (g["id"].as_u64().expect("id"), bytes.expect("disk_bytes"))
            })
            .collect()
    };
    let before_text = get(&http, "/metrics").await;
    let before = samples(&before_text);
    let (appends_before, _) = histogram(&before_text, "chatlog_storage_append_latency_seconds", "");
    let (syncs_before, _) = histogram(&before_text, "chatlog_storage_sync_latency_seconds", "");
    let disk_before = disk_of(&status(http.clone()).await);

    let options = ClientOptions {
        request_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let c = Client::connect(&server.addr, options.clone())
        .await
        .expect("connects");
    let created = c
        .create_user(v1::CreateUserRequest {
            name: "metrics".into(),
        })
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
        &server.addr,
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
            title: "metrics".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat")
        .chat_id;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("seed={seed}");
    for i in 0..MESSAGES {
        c.send_message(v1::SendMessageRequest {
            chat_id: chat,
            client_message_id: i + 1,
            text: text(&mut seed),
            media: None,
            reply_to_seq: 0,
        })
        .await
        .expect("sent (RATE_LIMITED refusals are repeated by the client)");
    }

    let after_text = get(&http, "/metrics").await;
    let after = samples(&after_text);
    let (appends, append_sum) =
        histogram(&after_text, "chatlog_storage_append_latency_seconds", "");
    let (syncs, sync_sum) = histogram(&after_text, "chatlog_storage_sync_latency_seconds", "");
    assert!(
        appends >= appends_before + MESSAGES as f64,
        "one append per message at least: {appends_before} -> {appends}"
    );
    assert!(syncs > syncs_before && sync_sum > 0.0 && append_sum >= sync_sum * 0.5);
    assert!(
        after["chatlog_storage_entries_written_total"]
            >= before["chatlog_storage_entries_written_total"] + MESSAGES as f64
    );
    assert!(
        after["chatlog_client_rate_limited_total"] >= 1.0,
        "{MESSAGES} sends at 5/s are refused some of the time"
    );
    assert!(
        after["chatlog_pushes_total"] >= 1.0,
        "the sender's own session is pushed the new events"
    );
    assert!(after["chatlog_disk_data_dir_bytes"] >= after["chatlog_storage_segment_bytes"]);
    assert!(after["chatlog_disk_free_bytes"] > 0.0);

    // The chat's group: the one whose disk size grew; it committed entries proposed here.
    let s = status(http.clone()).await;
    let disk_after = disk_of(&s);
    let (group, grown) = disk_after
        .iter()
        .map(|(g, b)| (*g, b.saturating_sub(disk_before[g])))
        .max_by_key(|(_, grown)| *grown)
        .expect("groups");
    let sent = MESSAGES * TEXT_BYTES as u64;
    assert!(
        grown >= sent * 9 / 10 && grown <= sent * 3,
        "group {group} grew by {grown} bytes on disk for {sent} bytes of text"
    );
    let total: u64 = disk_after.values().sum();
    assert!(
        total <= s["node"]["disk_bytes"].as_u64().expect("segment bytes"),
        "the groups' estimates add up to at most the segment files: {s}"
    );
    assert_eq!(
        after[&format!("chatlog_group_disk_bytes{{group=\"{group}\"}}")] as u64 / 4096,
        disk_after[&group] / 4096,
        "/metrics and status agree on group {group}'s size"
    );
    let (commits, commit_sum) = histogram(
        &after_text,
        "chatlog_group_commit_latency_seconds",
        &format!("group=\"{group}\""),
    );
    assert!(
        commits >= 1.0 && commit_sum > 0.0,
        "group {group}: {commits} commits"
    );
    assert!(s["node"]["data_dir_bytes"].as_u64().expect("data dir") > 0);

    // The CLI's table shows the same size, for people.
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(["admin", "status", "--server", &http])
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .output()
        .expect("admin status runs");
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().nth(1).expect("header");
    assert!(header.ends_with("DISK"), "{table}");
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&group.to_string()))
        .expect("the group's row");
    assert!(row.ends_with("KiB") || row.ends_with("MiB"), "{row}");
    assert!(table.contains("nodes: 1 up v"), "{table}");
    assert!(table.contains("disk of node 1: data dir "), "{table}");
}
