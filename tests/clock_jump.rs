//! Black-box: a real `chatlog serve` whose wall clock jumps an hour ahead and then two
//! hours back while a client posts, through the fault-injection hook
//! `CHATLOG_FAULT_CLOCK_OFFSET_FILE` (the node adds the file's milliseconds to its wall
//! clock; see `chatlog_raft::clock`).
//!
//! What must hold: message timestamps never go back and, after the jump ahead, advance
//! at most `SLEW_FACTOR` times as fast as real time (plus a second for the readings); a
//! send retried with its client message id a moment after the jump still returns the
//! original seq (the de-duplication window is measured in stamped time, so an unslewed
//! jump of an hour would have expired it and posted the retry twice); seqs stay dense.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/server.rs"]
mod server;

use std::time::{Duration, Instant};

use chatlog_raft::clock::SLEW_FACTOR;
use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::proto::v1;
use server::Server;

const HOUR_MS: i64 = 3_600_000;

fn options(token: Option<String>) -> ClientOptions {
    ClientOptions {
        token,
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

fn send(chat: u64, cmid: u64) -> v1::SendMessageRequest {
    v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: cmid,
        text: format!("m{cmid}"),
        media: None,
        reply_to_seq: 0,
    }
}

/// Makes the node's clock jump to `offset_ms` from real time, and waits until the node
/// has read the file (it polls every 20 ms).
async fn jump(file: &std::path::Path, offset_ms: i64) {
    std::fs::write(file, offset_ms.to_string()).expect("offset written");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jumping_clock_neither_reorders_timestamps_nor_breaks_deduplication() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock_file = dir.path().join("clock-offset");
    std::fs::write(&clock_file, "0").expect("offset file");
    let clock_env = clock_file.to_str().expect("utf-8 path").to_string();
    let srv = Server::start_env(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[],
        &[("CHATLOG_FAULT_CLOCK_OFFSET_FILE", &clock_env)],
    );
    let anon = Client::connect(&srv.addr, options(None))
        .await
        .expect("connects");
    let (_, session_token) = cluster::create_and_login(&anon, "tick", "d").await;
    let c = Client::connect(&srv.addr, options(Some(session_token)))
        .await
        .expect("connects");
    let chat = c
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "clock".into(),
            member_ids: Vec::new(),
        })
        .await
        .expect("chat")
        .chat_id;

    let first = c.send_message(send(chat, 1)).await.expect("sent");
    let mut last_ts = first.timestamp_ms;
    let mut stamps = vec![(first.seq, first.timestamp_ms)];

    // An hour ahead.
    let jumped = Instant::now();
    jump(&clock_file, HOUR_MS).await;
    for cmid in 2..=20 {
        let r = c.send_message(send(chat, cmid)).await.expect("sent");
        assert!(r.timestamp_ms >= last_ts, "timestamps never go back");
        let real_ms = jumped.elapsed().as_millis() as u64;
        assert!(
            r.timestamp_ms <= first.timestamp_ms + SLEW_FACTOR * real_ms + 1_000,
            "a jump ahead is slewed in: {} ms after {} ms of real time",
            r.timestamp_ms - first.timestamp_ms,
            real_ms
        );
        last_ts = r.timestamp_ms;
        stamps.push((r.seq, r.timestamp_ms));
    }
    // A retry of the first send, a moment later in real time, is de-duplicated.
    let retry = c.send_message(send(chat, 1)).await.expect("retried");
    assert!(
        retry.deduplicated && retry.seq == first.seq,
        "retry after the jump: {retry:?}"
    );

    // Two hours back (an hour behind real time).
    jump(&clock_file, -HOUR_MS).await;
    for cmid in 21..=40 {
        let r = c.send_message(send(chat, cmid)).await.expect("sent");
        assert!(
            r.timestamp_ms >= last_ts,
            "a jump back does not move timestamps back: {} after {last_ts}",
            r.timestamp_ms
        );
        last_ts = r.timestamp_ms;
        stamps.push((r.seq, r.timestamp_ms));
    }
    let retry = c.send_message(send(chat, 2)).await.expect("retried");
    assert!(retry.deduplicated, "retry after the jump back: {retry:?}");

    // History agrees: dense seqs, timestamps in seq order.
    let page = c
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 1,
            direction: v1::Direction::Forward.into(),
            limit: 100,
        })
        .await
        .expect("history");
    assert_eq!(
        page.events.len(),
        41,
        "chat creation and 40 messages, no duplicate"
    );
    for (i, w) in page.events.windows(2).enumerate() {
        assert_eq!(w[0].seq, i as u64 + 1);
        assert!(
            w[1].timestamp_ms >= w[0].timestamp_ms,
            "history timestamps in order"
        );
    }
    eprintln!(
        "{} sends over a +1 h and a -2 h jump: timestamps {}..{} ms ({} ms of stamped time)",
        stamps.len(),
        stamps[0].1,
        last_ts,
        last_ts - stamps[0].1
    );
}
