//! Black-box: three real `chatlog serve` processes on 127.0.0.1 forming one cluster,
//! driven through `chatlog_wire::Client` connected to different nodes.
//!
//! Covered: writes and linearizable reads from any node (proposals forwarded to the
//! group's leader, read indexes fetched from it); SIGKILL of the leader of a busy group
//! while writers keep writing (retrying with the same client message id against the
//! surviving nodes), then its restart from the same data directory, after which every
//! node returns the identical, dense event list holding every acknowledged send exactly
//! once at its seq; and a follower stopped while many messages are written catching up
//! from the log after its restart.
//!
//! Where leadership is: each node logs "leadership: this node leads the group" with the
//! group and term (`chatlog_raft::node`, at info); the tests read those lines from the
//! processes' stderr, and the line with the highest term names the current leader.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it. The random
//! seed (writer interleaving, which node each writer starts on) is printed; set
//! `CHATLOG_TEST_SEED` to repeat a run.

#[path = "common/cluster.rs"]
mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1::{self, event::Body};
use cluster::{Cluster, Options, full_history, retryable, send_request};
use rand::{Rng, SeedableRng};

const NODES: u64 = 3;
/// Longest anything that needs an election or a catch-up may take.
const WAIT: Duration = Duration::from_secs(60);

fn start_cluster() -> Cluster {
    Cluster::start(Options::default())
}

/// Connects to `addr`, retrying while the node cannot authenticate the token yet.
async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 1),
    )
    .await
}

/// Creates a user through node `addr` and logs in there: (user id, token, client).
async fn account(addr: &str, name: &str) -> (u64, String, Client) {
    let c = connect(addr, None).await;
    let (user, token) = cluster::create_and_login(&c, name, "dev").await;
    (user, token, c)
}

/// Whether a failed send may be retried (with the same client message id) elsewhere.
/// Sends until acknowledged, starting on `clients[start]` and moving to the next node
/// after a retryable failure; always with the same client message id.
async fn send_until_acked(
    clients: &[Client],
    start: usize,
    chat: u64,
    cmid: u64,
    text: &str,
) -> v1::SendMessageResponse {
    let deadline = Instant::now() + WAIT;
    let mut at = start;
    loop {
        match clients[at % clients.len()]
            .send_message(send_request(chat, cmid, text))
            .await
        {
            Ok(r) => return r,
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                at += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("send {text:?} failed: {e}"),
        }
    }
}

fn posted_text(e: &v1::Event) -> Option<&str> {
    match &e.body {
        Some(Body::MessagePosted(m)) => Some(&m.text),
        _ => None,
    }
}

/// Checks one node's event list: seqs dense from 1, every acknowledged send present
/// exactly once at its acknowledged seq.
fn check_events(node: u64, events: &[v1::Event], acked: &HashMap<String, u64>) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "node {node}: seqs are dense");
    }
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for e in events {
        if let Some(text) = posted_text(e)
            && let Some(first) = seen.insert(text, e.seq)
        {
            panic!("node {node}: {text:?} appears at seq {first} and {}", e.seq);
        }
    }
    for (text, seq) in acked {
        assert_eq!(
            seen.get(text.as_str()),
            Some(seq),
            "node {node}: acknowledged {text:?} at seq {seq}"
        );
    }
}

/// A group chat of `owner` with `members`, created through `client`; its id.
async fn group_chat(client: &Client, members: Vec<u64>) -> u64 {
    client
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "cluster".into(),
            member_ids: members,
        })
        .await
        .expect("chat created")
        .chat_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_and_a_killed_leader_loses_nothing_acknowledged() {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cluster::seed());
    let mut cluster = tokio::task::block_in_place(start_cluster);
    eprintln!("cluster up in {:?}", started.elapsed());

    // One user per node, each created and logged in through its own node: creation,
    // login and the chat go to whichever node leads their groups.
    let mut users = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        users.push(account(&cluster.addr(i as u64 + 1), name).await);
    }
    let ids: Vec<u64> = users.iter().map(|u| u.0).collect();
    let chat = group_chat(&users[0].2, ids[1..].to_vec()).await;
    let group = group_of(chat);

    // Every user sends through their own node; every node then reads everything.
    let mut acked: HashMap<String, u64> = HashMap::new();
    for round in 0..5 {
        for (i, (_, _, c)) in users.iter().enumerate() {
            let text = format!("warm-up {i}:{round}");
            let r = c
                .send_message(send_request(chat, 1 + round, &text))
                .await
                .expect("sent through any node");
            acked.insert(text, r.seq);
        }
    }
    for (i, (_, _, c)) in users.iter().enumerate() {
        let events = full_history(c, chat, WAIT).await;
        assert_eq!(events.len(), 16, "node {} reads every send at once", i + 1);
        check_events(i as u64 + 1, &events, &acked);
    }

    // Writers: each user gets clients on every node and keeps sending.
    let (leader, term) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    eprintln!("group {group} (chat {chat}) is led by node {leader} in term {term}");
    let mut writer_clients = Vec::new();
    for (_, token, _) in &users {
        let mut clients = Vec::new();
        for id in 1..=NODES {
            clients.push(connect(&cluster.addr(id), Some(token.clone())).await);
        }
        writer_clients.push(clients);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let mut writers = Vec::new();
    for (w, clients) in writer_clients.into_iter().enumerate() {
        for lane in 0..4u64 {
            let (stop, acks, clients) = (Arc::clone(&stop), Arc::clone(&acks), clients.clone());
            let start = rng.random_range(0..NODES as usize);
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("w{w}.{lane}:{i}");
                    let cmid = 1000 + lane * 1_000_000 + i;
                    let r = send_until_acked(&clients, start + i as usize, chat, cmid, &text).await;
                    acks.lock().expect("lock").push((text, r.seq));
                    i += 1;
                }
            }));
        }
    }
    let count = |acks: &Mutex<Vec<(String, u64)>>| acks.lock().expect("lock").len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = count(&acks);
    assert!(before_kill > 0, "writers make progress");

    cluster.kill(leader);
    eprintln!("killed node {leader} after {before_kill} writes");
    let (new_leader, new_term) = tokio::task::block_in_place(|| cluster.leader(group, term));
    assert_ne!(new_leader, leader);
    eprintln!("node {new_leader} leads group {group} in term {new_term}");
    let at_election = count(&acks);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        count(&acks) > at_election,
        "writes go on while node {leader} is down"
    );

    tokio::task::block_in_place(|| cluster.restart(leader));
    eprintln!("restarted node {leader}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    for (text, seq) in acks.lock().expect("lock").drain(..) {
        assert!(acked.insert(text, seq).is_none(), "a text was sent twice");
    }
    eprintln!("{} sends acknowledged", acked.len());

    // Every node, the restarted one included, serves the same dense list holding every
    // acknowledged send exactly once at its seq.
    let mut lists = BTreeMap::new();
    for id in 1..=NODES {
        let c = connect(&cluster.addr(id), Some(users[0].1.clone())).await;
        let events = full_history(&c, chat, WAIT).await;
        check_events(id, &events, &acked);
        lists.insert(id, events);
    }
    let first = &lists[&1];
    for (id, events) in &lists {
        assert_eq!(events, first, "node {id} and node 1 disagree");
    }
    eprintln!(
        "{} events identical on every node; test took {:?}",
        first.len(),
        started.elapsed()
    );
}

/// Messages written while the follower is down: the 100,000. Measured in a debug
/// build on 2 shared cores: written in ~22 s (~4,600/s, 512 in flight, batched into far
/// fewer Raft entries), caught up in ~5 s, ~37 s for the whole test. Each message is one
/// chat event, not one Raft entry: the batcher packs concurrent sends into entries, so
/// the follower lags by fewer entries than messages. `CHATLOG_CATCHUP_MESSAGES`
/// overrides the count.
const CATCHUP_MESSAGES: u64 = 100_000;
/// Sends in flight at once while writing them (the batcher turns them into few entries).
const CATCHUP_IN_FLIGHT: usize = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_follower_catches_up_from_the_log() {
    let started = Instant::now();
    let _ = cluster::seed();
    let messages = std::env::var("CHATLOG_CATCHUP_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CATCHUP_MESSAGES);
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let (alice, token, a) = account(&cluster.addr(1), "alice").await;
    let chat = group_chat(&a, Vec::new()).await;
    let group = group_of(chat);
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    let follower = (1..=NODES).find(|n| *n != leader).expect("a follower");
    let other = (1..=NODES)
        .find(|n| *n != leader && *n != follower)
        .expect("a third node");
    eprintln!("user {alice}, chat {chat} in group {group}: leader {leader}, stopping {follower}");
    cluster.kill(follower);

    // Write through the leader and through the other follower (forwarded).
    let clients = [
        connect(&cluster.addr(leader), Some(token.clone())).await,
        connect(&cluster.addr(other), Some(token.clone())).await,
    ];
    let write_started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..CATCHUP_IN_FLIGHT {
        let (clients, next) = (clients.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= messages {
                    return;
                }
                send_until_acked(&clients, t, chat, i + 1, &format!("m{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let write_time = write_started.elapsed();
    eprintln!(
        "{messages} messages written in {write_time:?} ({:.0}/s) while node {follower} was down",
        messages as f64 / write_time.as_secs_f64()
    );

    // Restart the follower: it catches up from the leader's log (snapshots are never
    // sent for lag below `replication_lag_threshold`, 1,000,000 entries).
    let restarted = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(follower));
    let c = connect(&cluster.addr(follower), Some(token.clone())).await;
    let head = messages + 1;
    cluster::wait_head(&c, follower, chat, head, WAIT).await;
    eprintln!(
        "node {follower} caught up {messages} messages in {:?} after its restart",
        restarted.elapsed()
    );
    // Its copy matches the leader's, event for event.
    let on_follower = full_history(&c, chat, WAIT).await;
    let on_leader = full_history(&clients[0], chat, WAIT).await;
    assert_eq!(on_follower.len() as u64, head);
    for (i, e) in on_follower.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "dense");
    }
    assert!(
        on_follower == on_leader,
        "the follower's copy differs from the leader's"
    );
    eprintln!("test took {:?}", started.elapsed());
}
