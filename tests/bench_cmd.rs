//! Black-box: `chatlog bench` runs each scenario briefly, against a server it embeds and
//! against a separate `chatlog serve` process on 127.0.0.1, and its `--json` report is
//! checked: non-zero throughput, ordered percentiles, zero errors, and a config that
//! echoes the flags.

#[path = "common/server.rs"]
mod server;

use server::{NO_RATE_LIMITS, Server};
use std::process::Command;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_chatlog");

/// Runs `chatlog bench ARGS --json`, which must succeed; its JSON report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("RUST_LOG", "error")
        .output()
        .expect("chatlog runs");
    assert!(
        out.status.success(),
        "chatlog bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "chatlog bench {args:?} printed no JSON ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The checks every report must pass.
fn sane(r: &Value, scenario: &str) {
    assert_eq!(r["scenario"], scenario, "{r}");
    assert_eq!(r["config"]["scenario"], scenario, "{r}");
    assert!(r["throughput_ops"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["throughput_mb"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
    assert!(r["measured_secs"].as_f64().unwrap() > 0.0, "{r}");
    let lat = &r["latency_us"];
    let p = |k: &str| {
        lat[k]
            .as_u64()
            .unwrap_or_else(|| panic!("latency_us.{k}: {r}"))
    };
    assert!(p("p50") > 0, "{r}");
    assert!(
        p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p999"),
        "{r}"
    );
    assert!(p("p999") <= p("max"), "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["errors_by_kind"], json!({}), "{r}");
    assert!(
        r["command"].as_str().unwrap().starts_with("chatlog bench"),
        "{r}"
    );
}

fn embedded_server_figures(r: &Value) {
    let server = &r["server"];
    assert!(server["cpu_secs"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(server["rss_bytes"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn send_embedded_zipf() {
    let r = bench(&[
        "send",
        "--embedded",
        "--groups",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--connections",
        "2",
        "--in-flight",
        "4",
        "--chats",
        "8",
        "--size",
        "100",
        "--distribution",
        "zipf:1.1",
    ]);
    sane(&r, "send");
    embedded_server_figures(&r);
    let c = &r["config"];
    assert_eq!(c["embedded"], true);
    assert_eq!(c["groups"], 4);
    assert_eq!(c["connections"], 2);
    assert_eq!(c["in_flight"], 4);
    assert_eq!(c["chats"], 8);
    assert_eq!(c["size"], 100);
    assert_eq!(c["distribution"], "zipf:1.1");
    assert_eq!(c["duration"], 1.0);
    assert_eq!(c["warmup"], 0.2);
    assert_eq!(c["rate"], Value::Null);
    // 100-byte messages: MB/s is ops/s × 100 bytes.
    let (ops, mb) = (
        r["throughput_ops"].as_f64().unwrap(),
        r["throughput_mb"].as_f64().unwrap(),
    );
    assert!((mb - ops * 100.0 / 1e6).abs() < 0.01, "{r}");
}

#[test]
fn send_to_a_separate_server_open_loop() {
    let dir = tempfile::tempdir().unwrap();
    // A load generator measures the server, not its rate limits.
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let addr = server.addr.clone();
    // Open loop: 150 measured sends at 300/s after 0.2 s of warm-up.
    let r = bench(&[
        "send",
        "--server",
        &addr,
        "--rate",
        "300",
        "--count",
        "150",
        "--duration",
        "5",
        "--warmup",
        "0.2",
        "--connections",
        "2",
        "--in-flight",
        "8",
        "--chats",
        "5",
    ]);
    sane(&r, "send");
    assert_eq!(r["ops"], 150, "{r}");
    assert!(
        r.get("server").is_none(),
        "no server figures for --server: {r}"
    );
    assert_eq!(r["config"]["server"], addr.as_str());
    assert_eq!(r["config"]["rate"], 300.0);
    assert_eq!(r["config"]["count"], 150);
    assert_eq!(r["latency_of"], "intended start to response");
    // Paced: 150 sends at 300/s cannot take less than about half a second; and the run
    // ended on its count, before the 5 s limit (not a speed check: a loaded host may be
    // slow, only not past the limit).
    let secs = r["measured_secs"].as_f64().unwrap();
    assert!((0.3..5.0).contains(&secs), "{r}");
    // A second run against the same server: its users and chats are new.
    let again = bench(&["send", "--server", &addr, "--count", "20", "--warmup", "0"]);
    sane(&again, "send");
    assert_eq!(again["ops"], 20, "{again}");
}

#[test]
fn sync_devices_catch_up_without_gaps() {
    let r = bench(&[
        "sync",
        "--embedded",
        "--groups",
        "4",
        "--devices",
        "3",
        "--chats",
        "3",
        "--backlog",
        "200",
        "--rounds",
        "2",
        "--page",
        "20",
        "--connections",
        "2",
        "--in-flight",
        "4",
    ]);
    sane(&r, "sync");
    embedded_server_figures(&r);
    // One device per chat: each posted message is caught up exactly once.
    assert_eq!(r["ops"], 400, "{r}");
    let s = &r["sync"];
    assert_eq!(s["rounds"], 2, "{r}");
    assert_eq!(s["events"], 400, "{r}");
    assert!(s["events_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(s["catch_up_us"]["count"], 6, "{r}");
    let c = &r["config"];
    assert_eq!(c["devices"], 3);
    assert_eq!(c["backlog"], 200);
    assert_eq!(c["rounds"], 2);
    assert_eq!(c["page"], 20);
}

#[test]
fn mixed_runs_every_kind() {
    let r = bench(&[
        "mixed",
        "--embedded",
        "--groups",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--connections",
        "2",
        "--in-flight",
        "4",
        "--chats",
        "4",
        "--mix",
        "send=50,history=30,sync=20",
    ]);
    sane(&r, "mixed");
    embedded_server_figures(&r);
    assert_eq!(r["config"]["mix"], "send=50,history=30,sync=20");
    let mut total = 0;
    for kind in ["send", "history", "sync"] {
        let ops = r["by_kind"][kind]["ops"].as_u64().unwrap_or(0);
        assert!(ops > 0, "no {kind} ops: {r}");
        total += ops;
    }
    assert_eq!(r["ops"].as_u64().unwrap(), total, "{r}");
}

#[test]
fn subscribe_delivers_every_post_to_every_subscriber() {
    let r = bench(&[
        "subscribe",
        "--embedded",
        "--groups",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--rate",
        "100",
        "--subscribers",
        "2",
        "--chats",
        "4",
        "--connections",
        "2",
        "--in-flight",
        "4",
    ]);
    sane(&r, "subscribe");
    let f = &r["subscribe"];
    assert!(f["posts"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(f["deliveries"], f["deliveries_expected"], "{r}");
    assert_eq!(f["subscriptions"], 8, "{r}");
    assert_eq!(r["config"]["subscribers"], 2);
}

/// The checks of a fanout report of `posts` posts to `online` subscribers.
fn fanout_delivered_everything(r: &Value, posts: u64, online: u64) {
    sane(r, "fanout");
    let f = &r["fanout"];
    assert_eq!(f["posts"], posts, "{r}");
    assert_eq!(f["posts_measured"], posts, "{r}");
    assert_eq!(f["subscribers"], online, "{r}");
    assert_eq!(f["connected"], online, "{r}");
    // Every subscriber got every post, exactly once and in seq order.
    assert_eq!(f["deliveries_expected"], posts * online, "{r}");
    assert_eq!(f["deliveries"], posts * online, "{r}");
    assert_eq!(f["subscribers_complete"], online, "{r}");
    assert_eq!(r["ops"], posts * online, "{r}");
    assert_eq!(r["latency_us"]["count"], posts * online, "{r}");
    // One "last subscriber" time and one acknowledgement per post.
    assert_eq!(f["last_delivery_us"]["count"], posts, "{r}");
    assert_eq!(f["post_ack_us"]["count"], posts, "{r}");
    assert!(f["deliveries_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    // The last subscriber is never earlier than the median one.
    assert!(
        f["last_delivery_us"]["max"].as_u64().unwrap() >= r["latency_us"]["p50"].as_u64().unwrap(),
        "{r}"
    );
}

#[test]
fn fanout_to_a_separate_server_reaches_every_subscriber_across_worker_processes() {
    let dir = tempfile::tempdir().unwrap();
    // One poster at 100 posts/s: over the default per-user send limit.
    let server = Server::start(dir.path(), &NO_RATE_LIMITS);
    let r = bench(&[
        "fanout",
        "--server",
        &server.addr,
        "--online",
        "50",
        "--workers",
        "2",
        "--count",
        "20",
        "--warmup",
        "0",
        "--duration",
        "30",
        "--size",
        "64",
    ]);
    fanout_delivered_everything(&r, 20, 50);
    assert_eq!(r["fanout"]["workers"], 2, "{r}");
    assert_eq!(r["fanout"]["members"], 50, "{r}");
    assert!(r.get("server").is_none(), "{r}");
    let c = &r["config"];
    assert_eq!(c["online"], 50);
    assert_eq!(c["workers"], 2);
    assert_eq!(c["post_interval_ms"], 10.0);
}

#[test]
fn fanout_with_offline_members_delivers_only_to_the_online_ones() {
    let r = bench(&[
        "fanout",
        "--embedded",
        "--groups",
        "4",
        "--online",
        "50",
        "--members",
        "300",
        "--count",
        "20",
        "--warmup",
        "0",
        "--duration",
        "30",
        "--post-interval-ms",
        "5",
    ]);
    fanout_delivered_everything(&r, 20, 50);
    embedded_server_figures(&r);
    let f = &r["fanout"];
    assert_eq!(f["members"], 300, "{r}");
    assert_eq!(f["online"], 50, "{r}");
    assert!(f["server_cpu_ms_per_post"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["config"]["post_interval_ms"], 5.0);
}

#[test]
fn catchup_device_receives_exactly_the_backlog() {
    let r = bench(&[
        "catchup",
        "--embedded",
        "--groups",
        "4",
        "--chats",
        "10",
        "--backlog",
        "1500",
        "--rounds",
        "2",
        "--connections",
        "2",
        "--in-flight",
        "8",
    ]);
    sane(&r, "catchup");
    embedded_server_figures(&r);
    let c = &r["catchup"];
    assert_eq!(c["rounds_ok"], 2, "{r}");
    assert_eq!(c["chats"], 10, "{r}");
    // 150 events per chat: more than one sync answer holds (100), so paging ran too.
    assert_eq!(c["events"], 3000, "{r}");
    assert_eq!(r["ops"], 3000, "{r}");
    assert!(c["requests"].as_u64().unwrap() >= 2 * (1 + 10), "{r}");
    assert_eq!(c["catch_up_us"]["count"], 2, "{r}");
    assert!(c["median_us"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["config"]["backlog"], 1500);
}

#[test]
fn media_uploads_and_downloads_through_the_protocol() {
    let r = bench(&[
        "media",
        "--embedded",
        "--groups",
        "2",
        "--connections",
        "2",
        "--chats",
        "1",
        "--count",
        "3",
        "--file-size",
        "3000000",
    ]);
    sane(&r, "media");
    embedded_server_figures(&r);
    let m = &r["media"];
    assert_eq!(r["ops"], 6, "3 uploads and 3 downloads: {r}");
    assert_eq!(r["bytes"], 18_000_000, "{r}");
    for phase in ["upload", "download"] {
        assert_eq!(m[phase]["files"], 3, "{r}");
        assert!(m[phase]["mb_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(m[phase]["rss_anon_peak_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    assert_eq!(r["config"]["file_size"], 3_000_000, "{r}");
    assert_eq!(m["download_to"], "file", "{r}");

    // --sink: the same checked downloads, no output file; the command repeats the flag.
    let r = bench(&[
        "media",
        "--embedded",
        "--groups",
        "2",
        "--connections",
        "1",
        "--chats",
        "1",
        "--count",
        "2",
        "--file-size",
        "1500000",
        "--in-flight",
        "16",
        "--sink",
    ]);
    sane(&r, "media");
    let m = &r["media"];
    assert_eq!(r["ops"], 4, "2 uploads and 2 downloads: {r}");
    assert_eq!(m["download"]["files"], 2, "{r}");
    assert_eq!(m["download_to"], "sink (checked, not kept)", "{r}");
    assert_eq!(m["parts_in_flight"], 16, "{r}");
    assert_eq!(r["config"]["sink"], true, "{r}");
    assert!(r["command"].as_str().unwrap().contains("--sink"), "{r}");
}

#[test]
fn help_names_every_flag() {
    let out = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .expect("chatlog runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--server",
        "--embedded",
        "--groups",
        "--connections",
        "--in-flight",
        "--size",
        "--chats",
        "--distribution",
        "--count",
        "--duration",
        "--rate",
        "--warmup",
        "--mix",
        "--page",
        "--devices",
        "--backlog",
        "--rounds",
        "--subscribers",
        "--seed",
        "--file-size",
        "--sink",
        "--json",
        "media",
        "subscribe",
        "fanout",
        "catchup",
        "--online",
        "--members",
        "--workers",
        "--post-interval-ms",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}
