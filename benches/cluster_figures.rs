//! Figures of cluster changes on real `chatlog serve` processes (release build): leader
//! failover after SIGKILL, and the time of a replica move of a group filled with data.
//!
//! `cargo bench --bench cluster_figures -- [failover] [move] [forward] [forward_media]` (all without
//! arguments).
//!
//! - failover: a 3-node cluster, one writer per surviving node sending to one chat one
//!   message at a time (retrying with the same client message id on the next node); the
//!   leader of the chat's group gets SIGKILL; the figure is the time from the kill to the
//!   first acknowledged write issued after it. Repeated `CHATLOG_FAILOVER_RUNS` times (5)
//!   with the killed node restarted in between; prints each and the median.
//! - move: a 3-node cluster; one chat's group is filled for `CHATLOG_FILL_SECS` (60) or up
//!   to `CHATLOG_FILL_BYTES` (1 GiB) of message text, whichever comes first (16 KiB
//!   messages of random letters, each different, 64 in flight); a 4th node joins and the group's replica moves to it
//!   (`admin replica move`, waiting) while a writer keeps sending; prints the bytes, the
//!   move time and the longest gap between acknowledged writes during it.
//! - forward: what a node without a replica costs a client. 4 nodes, 3 replicas per
//!   group, 2 groups: node 1 holds no replica of group 1. A user of group 1 with a chat
//!   of group 1 (100 posts) does, one at a time, a history read (the newest 20 events)
//!   and a post, through node 1 (both forwarded: the session check needs group 1) and
//!   through node 2 (a replica of group 1, not its leader: the leadership is moved to
//!   node 3 first), `CHATLOG_FORWARD_ROUNDS` (4) rounds of
//!   `CHATLOG_FORWARD_CALLS` (500) calls per path and kind, the paths alternating;
//!   prints p50 / p99 per path and the ratios.
//! - forward_media: the same cluster; the user uploads a new file of
//!   `CHATLOG_FORWARD_MEDIA_MIB` (64) MiB and downloads it, through node 1 (the upload
//!   forwarded to a replica of group 1, the download asked of the nodes that store it)
//!   and through node 2, `CHATLOG_FORWARD_ROUNDS` (4) rounds after a warm-up, the paths
//!   alternating; prints MiB/s per path and the ratios.

#[path = "../tests/common/cluster.rs"]
mod cluster;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::{Client, ClientError};
use chatlog_wire::proto::v1::{self, ErrorCode};
use cluster::{Cluster, Options};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 0),
    )
    .await
}

fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout)
        }
        ClientError::Timeout | ClientError::Disconnected | ClientError::Io(_) => true,
        _ => false,
    }
}

fn send(chat: u64, cmid: u64, text: String) -> v1::SendMessageRequest {
    v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: cmid,
        text,
        media: None,
        reply_to_seq: 0,
    }
}

/// Sends until acknowledged, moving to the next client after a retryable failure.
async fn send_acked(clients: &[Client], start: usize, chat: u64, cmid: u64, text: &str) {
    let mut at = start;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match clients[at % clients.len()]
            .send_message(send(chat, cmid, text.to_owned()))
            .await
        {
            Ok(_) => return,
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                at += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("send failed: {e}"),
        }
    }
}

fn admin(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .arg("admin")
        .args(args)
        .arg("--json")
        .output()
        .expect("chatlog admin runs");
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A user and a group chat through node 1: (token, chat).
async fn setup(cluster: &Cluster) -> (String, u64) {
    let c = connect(&cluster.addr(1), None).await;
    let (_, token) = cluster::create_and_login(&c, "figures", "bench").await;
    let a = connect(&cluster.addr(1), Some(token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "figures".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat")
        .chat_id;
    (token, chat)
}

/// Serial latencies (µs) of `calls` history reads and `calls` posts through `c`.
async fn serial_calls(c: &Client, chat: u64, calls: u64, cmid: &AtomicU64) -> (Vec<u64>, Vec<u64>) {
    let (mut reads, mut posts) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let t = Instant::now();
        let page = c
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: 0,
                direction: v1::Direction::Backward.into(),
                limit: 20,
            })
            .await
            .expect("history");
        reads.push(t.elapsed().as_micros() as u64);
        assert_eq!(page.events.len(), 20);
        let t = Instant::now();
        c.send_message(send(
            chat,
            cmid.fetch_add(1, Ordering::Relaxed),
            "x".repeat(256),
        ))
        .await
        .expect("post");
        posts.push(t.elapsed().as_micros() as u64);
    }
    (reads, posts)
}

fn quantile(v: &mut [u64], q: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0
}

/// A new user of group 1, logged in through node 2: its session token.
async fn user_of_group_1(cluster: &Cluster) -> String {
    let setup = connect(&cluster.addr(2), None).await;
    let (user, login_token) = loop {
        let n = cluster::free_port();
        let created = cluster::create_user(&setup, &format!("fwd{n}")).await;
        if group_of(created.user_id) == 1 {
            break (created.user_id, created.login_token);
        }
    };
    let login = cluster::login(
        &setup,
        v1::LoginRequest {
            user_id: user,
            login_token,
            device_id: "bench".into(),
            device_name: "bench".into(),
        },
    )
    .await;
    login.session_token
}

async fn forward() {
    let rounds = env_u64("CHATLOG_FORWARD_ROUNDS", 4);
    let calls = env_u64("CHATLOG_FORWARD_CALLS", 500);
    let cluster =
        tokio::task::block_in_place(|| Cluster::start(Options::more_nodes_than_replicas()));
    let token = user_of_group_1(&cluster).await;
    let near = connect(&cluster.addr(2), Some(token.clone())).await;
    let far = connect(&cluster.addr(1), Some(token)).await;
    // A chat of group 1 (new chats go round-robin).
    let chat = loop {
        let chat = near
            .create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: "forward".into(),
                member_ids: vec![],
            })
            .await
            .expect("chat")
            .chat_id;
        if group_of(chat) == 1 {
            break chat;
        }
    };
    let cmid = AtomicU64::new(1);
    for _ in 0..100 {
        near.send_message(send(
            chat,
            cmid.fetch_add(1, Ordering::Relaxed),
            "x".repeat(256),
        ))
        .await
        .expect("fill");
    }
    // Group 1's leader on node 3: through node 2 (a follower) a post goes on to it, and
    // through node 1 it takes one hop once node 1 knows the leader (two before).
    cluster.lead_on(1, 3).await;
    // Warm both paths (connections between the nodes, caches).
    serial_calls(&far, chat, 50, &cmid).await;
    serial_calls(&near, chat, 50, &cmid).await;
    let (mut far_reads, mut far_posts, mut near_reads, mut near_posts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which path goes first.
        let order: [(&Client, bool); 2] = if round % 2 == 0 {
            [(&far, true), (&near, false)]
        } else {
            [(&near, false), (&far, true)]
        };
        for (c, is_far) in order {
            let (r, p) = serial_calls(c, chat, calls, &cmid).await;
            if is_far {
                far_reads.extend(r);
                far_posts.extend(p);
            } else {
                near_reads.extend(r);
                near_posts.extend(p);
            }
        }
    }
    let (fr50, fr99) = (
        quantile(&mut far_reads, 0.5),
        quantile(&mut far_reads, 0.99),
    );
    let (nr50, nr99) = (
        quantile(&mut near_reads, 0.5),
        quantile(&mut near_reads, 0.99),
    );
    let (fp50, fp99) = (
        quantile(&mut far_posts, 0.5),
        quantile(&mut far_posts, 0.99),
    );
    let (np50, np99) = (
        quantile(&mut near_posts, 0.5),
        quantile(&mut near_posts, 0.99),
    );
    println!(
        "forward: history (20 events) through node 1 (forwarded) p50 {fr50:.3} ms p99 {fr99:.3} ms, \
         through node 2 (replica) p50 {nr50:.3} ms p99 {nr99:.3} ms, p50 ratio {:.2}",
        fr50 / nr50
    );
    println!(
        "forward: post through node 1 (forwarded) p50 {fp50:.3} ms p99 {fp99:.3} ms, \
         through node 2 (replica) p50 {np50:.3} ms p99 {np99:.3} ms, p50 ratio {:.2}",
        fp50 / np50
    );
    println!(
        "forward: {rounds} rounds × {calls} calls per path and kind, serial (1 in flight), \
         group 1's leader on node {:?}",
        cluster.last_leader(1)
    );
}

async fn forward_media() {
    let rounds = env_u64("CHATLOG_FORWARD_ROUNDS", 4);
    let mib = env_u64("CHATLOG_FORWARD_MEDIA_MIB", 64);
    let cluster =
        tokio::task::block_in_place(|| Cluster::start(Options::more_nodes_than_replicas()));
    let token = user_of_group_1(&cluster).await;
    let near = connect(&cluster.addr(2), Some(token.clone())).await;
    let far = connect(&cluster.addr(1), Some(token)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut speeds: [[Vec<f64>; 2]; 2] = Default::default();
    for round in 0..rounds + 1 {
        // Alternate which path goes first; round 0 warms both and is not counted.
        let order: [(&Client, usize); 2] = if round % 2 == 0 {
            [(&far, 0), (&near, 1)]
        } else {
            [(&near, 1), (&far, 0)]
        };
        for (c, path) in order {
            // A new file each time (else the upload is deduplicated).
            let file = dir.path().join(format!("up-{round}-{path}"));
            let mut bytes = vec![0u8; (mib << 20) as usize];
            let mut x = (round as u64) << 8 | path as u64 | 1;
            for chunk in bytes.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(&file, &bytes).expect("write");
            drop(bytes);
            let t = Instant::now();
            let finished = c
                .upload_file(&file, Default::default(), |_| {})
                .await
                .expect("upload");
            let up = t.elapsed().as_secs_f64();
            let sha: [u8; 32] = finished.media.expect("media").sha256[..]
                .try_into()
                .expect("sha");
            let t = Instant::now();
            c.download_file(sha, &dir.path().join("down"), Default::default(), |_| {})
                .await
                .expect("download");
            let down = t.elapsed().as_secs_f64();
            if round > 0 {
                speeds[0][path].push(mib as f64 / up);
                speeds[1][path].push(mib as f64 / down);
            }
            std::fs::remove_file(&file).expect("remove");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (kind, [far, near]) in ["upload", "download"].into_iter().zip(&mut speeds) {
        let (f, n) = (median(far), median(near));
        println!(
            "forward media: {kind} of {mib} MiB through node 1 (forwarded) {f:.0} MiB/s \
             (runs {far:.0?}), through node 2 (replica) {n:.0} MiB/s (runs {near:.0?}), \
             ratio {:.2}",
            f / n
        );
    }
    println!(
        "forward media: {rounds} rounds, the paths alternating, after a warm-up round; \
         default transfer options (parts / chunks in flight)"
    );
}

async fn failover() {
    let runs = env_u64("CHATLOG_FAILOVER_RUNS", 5);
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            http: true,
            ..Options::default()
        })
    });
    let (token, chat) = setup(&cluster).await;
    let group = group_of(chat);
    let mut figures = Vec::new();
    let mut term = 0;
    for run in 0..runs {
        let (leader, t) = tokio::task::block_in_place(|| cluster.leader(group, term));
        term = t;
        let mut clients = Vec::new();
        for n in cluster.ids().filter(|n| *n != leader) {
            clients.push(connect(&cluster.addr(n), Some(token.clone())).await);
        }
        let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let first_after: Arc<Mutex<Option<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let cmid = Arc::new(AtomicU64::new(1_000_000 * (run + 1)));
        let mut writers = Vec::new();
        for w in 0..clients.len() {
            let (clients, killed_at, first_after, stop, cmid) = (
                clients.clone(),
                Arc::clone(&killed_at),
                Arc::clone(&first_after),
                Arc::clone(&stop),
                Arc::clone(&cmid),
            );
            writers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let issued = Instant::now();
                    let id = cmid.fetch_add(1, Ordering::Relaxed);
                    send_acked(&clients, w, chat, id, "failover").await;
                    let acked = Instant::now();
                    let killed = *killed_at.lock().expect("lock");
                    if let Some(k) = killed
                        && issued >= k
                    {
                        let mut f = first_after.lock().expect("lock");
                        if f.is_none() {
                            *f = Some(acked);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tokio::task::block_in_place(|| cluster.kill(leader));
        let k = Instant::now();
        *killed_at.lock().expect("lock") = Some(k);
        let deadline = Instant::now() + Duration::from_secs(30);
        while first_after.lock().expect("lock").is_none() {
            assert!(Instant::now() < deadline, "no write after the kill");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = first_after
            .lock()
            .expect("lock")
            .expect("set")
            .duration_since(k);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let _ = w.await;
        }
        println!(
            "failover run {}: node {leader} killed; first ack after {took:?}",
            run + 1
        );
        figures.push(took);
        tokio::task::block_in_place(|| cluster.restart(leader));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    figures.sort();
    println!(
        "failover: median {:?} over {} runs (min {:?}, max {:?})",
        figures[figures.len() / 2],
        figures.len(),
        figures[0],
        figures[figures.len() - 1]
    );
}

async fn replica_move() {
    let fill_secs = env_u64("CHATLOG_FILL_SECS", 60);
    let fill_bytes = env_u64("CHATLOG_FILL_BYTES", 1 << 30);
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            http: true,
            ..Options::default()
        })
    });
    let (token, chat) = setup(&cluster).await;
    let group = group_of(chat);
    let mut clients = Vec::new();
    for n in cluster.ids() {
        clients.push(connect(&cluster.addr(n), Some(token.clone())).await);
    }
    // Every message its own random letters, so LZ4 in the engine (which compresses a
    // batch of messages as one record) cannot shrink what the move copies.
    const TEXT_BYTES: usize = 16 * 1024 - 64;
    let written = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64usize {
        let (clients, written, next) = (clients.clone(), Arc::clone(&written), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            while started.elapsed() < Duration::from_secs(fill_secs)
                && written.load(Ordering::Relaxed) < fill_bytes
            {
                let text: String = (0..TEXT_BYTES)
                    .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                    .collect();
                let id = next.fetch_add(1, Ordering::Relaxed);
                send_acked(&clients, t, chat, id, &text).await;
                written.fetch_add(text.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let bytes = written.load(Ordering::Relaxed);
    let fill_time = started.elapsed();
    println!(
        "filled group {group}: {:.0} MiB of message text in {fill_time:?} ({} messages)",
        bytes as f64 / (1 << 20) as f64,
        next.load(Ordering::Relaxed) - 1
    );
    let four = tokio::task::block_in_place(|| cluster.join(1));
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    let from = cluster
        .ids()
        .find(|n| *n != leader && *n != four)
        .expect("a follower");
    // A writer keeps going during the move; the longest gap between its acks is the
    // move's unavailability window.
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let writer = {
        let (clients, stop, acks, next) = (
            clients.clone(),
            Arc::clone(&stop),
            Arc::clone(&acks),
            Arc::clone(&next),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = next.fetch_add(1, Ordering::Relaxed);
                send_acked(&clients, 0, chat, id, "during the move").await;
                acks.lock().expect("lock").push(Instant::now());
            }
        })
    };
    let http = cluster.http_addr(leader);
    let g = group.to_string();
    let (f, t) = (from.to_string(), four.to_string());
    let moved_at = Instant::now();
    let v = tokio::task::block_in_place(|| {
        admin(&[
            "replica", "move", "--server", &http, "--group", &g, "--from", &f, "--to", &t,
        ])
    });
    let took = moved_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let times = acks.lock().expect("lock").clone();
    let mut edges = vec![moved_at];
    edges.extend(times.iter().copied().filter(|t| *t >= moved_at));
    let gap = edges
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    println!(
        "move of group {group} ({:.0} MiB) from node {from} to node {four}: {took:?} (server: {} ms); \
         {} writes acknowledged during it, longest gap {gap:?}",
        bytes as f64 / (1 << 20) as f64,
        v["elapsed_ms"],
        times.len()
    );
    for n in cluster.ids() {
        let out = Command::new("du")
            .arg("-sm")
            .arg(cluster.dir(n))
            .output()
            .expect("du runs");
        print!(
            "node {n} data dir: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The new replica holds the whole group: its disk, and the first and last events
    // read through it (a read there needs its own copy).
    let s4 =
        tokio::task::block_in_place(|| admin(&["status", "--server", &cluster.http_addr(four)]));
    let c4 = connect(&cluster.addr(four), Some(token.clone())).await;
    let first = c4
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 2,
            direction: v1::Direction::Forward.into(),
            limit: 1,
        })
        .await
        .expect("history on the new replica");
    println!(
        "node {four} after the move: {:.0} MiB on disk; head seq {}, seq 2 holds {} bytes of text",
        s4["node"]["disk_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        first.head_seq,
        first
            .events
            .first()
            .and_then(|e| match &e.body {
                Some(v1::event::Body::MessagePosted(m)) => Some(m.text.len()),
                _ => None,
            })
            .unwrap_or(0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = args.is_empty();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if all || args.iter().any(|a| a == "failover") {
            failover().await;
        }
        if all || args.iter().any(|a| a == "move") {
            replica_move().await;
        }
        if all || args.iter().any(|a| a == "forward") {
            forward().await;
        }
        if all || args.iter().any(|a| a == "forward_media") {
            forward_media().await;
        }
    });
}
