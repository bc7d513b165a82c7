//! Black-box: a rolling restart of a 3-process cluster under steady write load.
//!
//! Every node is restarted one at a time — nodes 1 and 2 with SIGTERM (the orderly stop
//! an operator's service manager sends), node 3 with SIGKILL (a crash) — and the next one
//! only once the restarted node serves again (`/ready` answers 200: every local group
//! runs and knows a leader) and writes flow. Writers (two users, several lanes each)
//! send all along through the client library (its own redials and resends) with one
//! connection per node; a retryable error (the node went away, no leader yet) makes the
//! writer resend the same client message id through the next node, so nothing but
//! success reaches the writer's caller, and any other error fails the test. Afterwards
//! every node serves the same dense log holding every acknowledged send exactly once at
//! its seq (the checks of `common/history.rs`), and each step's unavailability window
//! (the longest gap between acknowledged writes while it ran) is printed; the figures
//! are recorded in docs/operations.md.
//!
//! Every wait has a deadline. The seed (which node each writer starts on) is printed;
//! `CHATLOG_TEST_SEED` repeats a run.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/history.rs"]
mod history;
#[path = "common/load.rs"]
mod load;
use load::{Acks, to_history_events};

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options, full_history, retryable, send_request};
use rand::{Rng, SeedableRng};

/// Longest anything that needs an election or a catch-up may take.
const WAIT: Duration = Duration::from_secs(60);
/// Writer tasks per user.
const LANES: u64 = 3;

async fn connect(addr: &str, token: Option<String>) -> Client {
    // The library redials (once per call) and resends a timed-out or refused-as-
    // unavailable request itself, with the same client message id.
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(5), 2),
    )
    .await
}

/// `GET /ready` on `http`: its status code, or `None` when nothing answers.
fn ready(http: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(http).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET /ready HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_nothing() {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cluster::seed());
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            groups: 2,
            http: true,
            ..Options::default()
        })
    });
    eprintln!("cluster up in {:?}", started.elapsed());

    let c1 = connect(&cluster.addr(1), None).await;
    let (alice, alice_token) = cluster::create_and_login(&c1, "alice", "dev").await;
    let c2 = connect(&cluster.addr(2), None).await;
    let (bob, bob_token) = cluster::create_and_login(&c2, "bob", "dev").await;
    let a = connect(&cluster.addr(1), Some(alice_token.clone())).await;
    // Right after start a group may still be electing: UNAVAILABLE proposed nothing, so
    // asking again is safe.
    let deadline = Instant::now() + WAIT;
    let chat = loop {
        match a
            .create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: "busy".into(),
                member_ids: vec![bob],
            })
            .await
        {
            Ok(r) => break r.chat_id,
            Err(e) if e.code() == Some(v1::ErrorCode::Unavailable) && Instant::now() < deadline => {
                eprintln!("creating the chat: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chat created: {e}"),
        }
    };
    eprintln!(
        "users {alice} and {bob}; chat {chat} in group {}",
        group_of(chat)
    );

    let hist = Arc::new(history::History::default());
    let acks = Arc::new(Acks::default());
    let failovers = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, (user, token)) in [(alice, &alice_token), (bob, &bob_token)]
        .into_iter()
        .enumerate()
    {
        let mut clients = Vec::new();
        for id in 1..=3 {
            clients.push(connect(&cluster.addr(id), Some(token.clone())).await);
        }
        for lane in 0..LANES {
            let (stop, acks, hist, clients, failovers) = (
                Arc::clone(&stop),
                Arc::clone(&acks),
                Arc::clone(&hist),
                clients.clone(),
                Arc::clone(&failovers),
            );
            let start = rng.random_range(0..clients.len());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                let mut at = start;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("w{w}.{lane}:{i}");
                    let cmid = 1 + lane * 1_000_000 + i;
                    let invoked = hist.tick();
                    let deadline = Instant::now() + WAIT;
                    let outcome = loop {
                        match clients[at % clients.len()]
                            .send_message(send_request(chat, cmid, &text))
                            .await
                        {
                            Ok(r) => {
                                acks.times.lock().expect("lock").push(Instant::now());
                                break history::Outcome::Acked { seq: r.seq };
                            }
                            Err(e) if retryable(&e) && Instant::now() < deadline => {
                                failovers.fetch_add(1, Ordering::Relaxed);
                                at += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("send {text:?}: {e}"),
                        }
                    };
                    hist.record_send(history::Send {
                        chat,
                        sender: user,
                        cmid,
                        text,
                        outcome,
                        invoked,
                        completed: hist.tick(),
                    });
                    i += 1;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(acks.count() > 0, "writers make progress");

    let mut windows = Vec::new();
    for id in 1..=3u64 {
        let how = if id == 3 { "SIGKILL" } else { "SIGTERM" };
        let name = format!("restart node {id} ({how})");
        let before = acks.count();
        let step_started = Instant::now();
        tokio::task::block_in_place(|| {
            if id == 3 {
                cluster.kill(id);
            } else {
                cluster.stop(id);
            }
        });
        let down_at = Instant::now();
        tokio::task::block_in_place(|| cluster.restart(id));
        let http = cluster.http_addr(id);
        let deadline = Instant::now() + WAIT;
        while tokio::task::block_in_place(|| ready(&http)) != Some(200) {
            assert!(Instant::now() < deadline, "node {id} ready again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let serving_after = down_at.elapsed();
        // Writes must be flowing again (through every node) before the next node goes.
        let deadline = Instant::now() + WAIT;
        while acks.count() < before + 50 {
            assert!(Instant::now() < deadline, "{name}: writes did not resume");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let took = step_started.elapsed();
        let gap = acks.longest_gap(step_started, Instant::now());
        eprintln!(
            "step {name}: node ready again {serving_after:?} after it went down; step took \
             {took:?}; longest gap between acknowledged writes {gap:?}"
        );
        windows.push((name, serving_after, gap));
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("no error reached a writer");
    }
    let total = hist.sends.lock().expect("lock").len();
    eprintln!(
        "{total} sends acknowledged; {} resends through another node after a retryable error",
        failovers.load(Ordering::Relaxed)
    );

    // Every node serves the same log with every acknowledged send once at its seq.
    for n in 1..=3u64 {
        let c = connect(&cluster.addr(n), Some(alice_token.clone())).await;
        let events = full_history(&c, chat, WAIT).await;
        hist.record_log(n, chat, to_history_events(&events));
    }
    let mut failed = false;
    for (name, violations) in history::check_all(&hist) {
        if !violations.is_empty() {
            failed = true;
            eprintln!("VIOLATED {name}:");
            for v in violations.iter().take(10) {
                eprintln!("  {v}");
            }
        }
    }
    assert!(!failed, "history checks");
    eprintln!("unavailability windows (longest gap between acknowledged writes per step):");
    for (name, serving_after, gap) in &windows {
        eprintln!("  {name:<28} ready again after {serving_after:>10.2?}  gap {gap:>10.2?}");
    }
    eprintln!("test took {:?}", started.elapsed());
}
