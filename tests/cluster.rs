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

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::{Client, ClientError, ClientOptions, ReconnectPolicy};
use chatlog_wire::proto::v1::{self, ErrorCode, event::Body};
use rand::{Rng, SeedableRng};

const NODES: u64 = 3;
const GROUPS: &str = "4";
const HEARTBEAT_MS: &str = "100";
/// Longest a node may take to announce its client address.
const START_WAIT: Duration = Duration::from_secs(60);
/// Longest anything that needs an election or a catch-up may take.
const WAIT: Duration = Duration::from_secs(60);

/// (group, term, node) of every "this node leads the group" line any node logged.
type Leadership = Arc<Mutex<Vec<(u64, u64, u64)>>>;

struct Node {
    dir: PathBuf,
    listen: String,
    child: Option<Child>,
}

struct Cluster {
    _root: tempfile::TempDir,
    initial: String,
    nodes: Vec<Node>,
    leadership: Leadership,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Removes ANSI colour sequences (the log format may colour field names).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

impl Cluster {
    /// Starts three nodes, each with its own data directory, and waits until each
    /// announced its client address.
    fn start() -> Cluster {
        let root = tempfile::tempdir().expect("temp dir");
        let initial: Vec<String> = (1..=NODES)
            .map(|id| format!("{id}=127.0.0.1:{}", free_port()))
            .collect();
        let mut cluster = Cluster {
            initial: initial.join(","),
            nodes: (1..=NODES)
                .map(|id| Node {
                    dir: root.path().join(format!("node-{id}")),
                    listen: "127.0.0.1:0".into(),
                    child: None,
                })
                .collect(),
            _root: root,
            leadership: Arc::default(),
        };
        // Start every process before waiting for any: a node announces its address
        // only after its groups have leaders, which needs the others.
        let announced: Vec<_> = (1..=NODES).map(|id| cluster.spawn(id)).collect();
        for (id, rx) in (1..=NODES).zip(announced) {
            cluster.wait_announced(id, rx);
        }
        cluster
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// The client address of node `id`.
    fn addr(&self, id: u64) -> String {
        self.nodes[(id - 1) as usize].listen.clone()
    }

    fn spawn(&mut self, id: u64) -> mpsc::Receiver<String> {
        let initial = self.initial.clone();
        let leadership = Arc::clone(&self.leadership);
        let node = self.node(id);
        std::fs::create_dir_all(&node.dir).expect("data dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog"))
            .args([
                "serve",
                "--node-id",
                &id.to_string(),
                "--listen",
                &node.listen,
            ])
            .args(["--initial-cluster", &initial, "--groups", GROUPS])
            // The load here is many users' worth; rate limits have their own test.
            .args(["--user-sends-per-sec", "0", "--conn-requests-per-sec", "0"])
            .args(["--heartbeat-ms", HEARTBEAT_MS, "--data-dir"])
            .arg(&node.dir)
            .env("RUST_LOG", "warn,openraft=error,chatlog_raft::node=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chatlog serve starts");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            // Keep draining after the announcement, so the process never blocks on stdout.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("clients: ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if line.contains("leadership: this node leads the group")
                    && let (Some(g), Some(t), Some(n)) = (
                        field(&line, "group"),
                        field(&line, "term"),
                        field(&line, "node"),
                    )
                {
                    leadership.lock().expect("lock").push((g, t, n));
                    continue;
                }
                eprintln!("[node {id}] {line}");
            }
        });
        node.child = Some(child);
        rx
    }

    fn wait_announced(&mut self, id: u64, rx: mpsc::Receiver<String>) {
        let addr = rx
            .recv_timeout(START_WAIT)
            .unwrap_or_else(|e| panic!("node {id} announced no client address: {e}"));
        // A restart listens on the same address, so clients redial it.
        self.node(id).listen = addr;
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(&mut self, id: u64) {
        let mut child = self.node(id).child.take().expect("running");
        child.kill().expect("kill");
        child.wait().expect("reaped");
    }

    /// Starts node `id` again on its data directory and client address.
    fn restart(&mut self, id: u64) {
        let rx = self.spawn(id);
        self.wait_announced(id, rx);
    }

    /// The node that leads `group` in the highest term logged so far, once it is above
    /// `above_term`; with its term.
    fn leader(&self, group: u64, above_term: u64) -> (u64, u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let best = self
                .leadership
                .lock()
                .expect("lock")
                .iter()
                .filter(|(g, t, _)| *g == group && *t > above_term)
                .max_by_key(|(_, t, _)| *t)
                .map(|(_, t, n)| (*n, *t));
            if let Some(found) = best {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no leader of group {group} above term {above_term}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn options(token: Option<String>) -> ClientOptions {
    ClientOptions {
        token,
        request_timeout: Duration::from_secs(10),
        // The tests switch nodes themselves when one is down; no long redial loops.
        reconnect: ReconnectPolicy {
            attempts_max: 1,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
        },
        retries_max: 1,
        ..ClientOptions::default()
    }
}

/// Connects to `addr`, retrying while the node cannot authenticate the token yet (its
/// replica of the user's group applies the login a heartbeat after the leader).
async fn connect(addr: &str, token: Option<String>) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::connect(addr, options(token.clone())).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connecting to {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    }
}

/// Creates a user through node `addr` and logs in there: (user id, token, client).
async fn account(addr: &str, name: &str) -> (u64, String, Client) {
    let c = connect(addr, None).await;
    // Right after start a group may still be electing (slower on a loaded CI machine):
    // UNAVAILABLE means nothing was proposed, so asking again is safe.
    let deadline = Instant::now() + WAIT;
    let created = loop {
        match c
            .create_user(v1::CreateUserRequest { name: name.into() })
            .await
        {
            Ok(created) => break created,
            Err(e) if e.code() == Some(ErrorCode::Unavailable) && Instant::now() < deadline => {
                eprintln!("creating {name} through {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("user created: {e}"),
        }
    };
    let login = c
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: "dev".into(),
            device_name: format!("{name}'s device"),
        })
        .await
        .expect("logged in");
    (created.user_id, login.session_token, c)
}

fn send_request(chat: u64, cmid: u64, text: &str) -> v1::SendMessageRequest {
    v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: cmid,
        text: text.into(),
        media: None,
        reply_to_seq: 0,
    }
}

/// Whether a failed send may be retried (with the same client message id) elsewhere.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout)
        }
        ClientError::Timeout | ClientError::Disconnected | ClientError::Io(_) => true,
        ClientError::Protocol(_) | ClientError::Encode(_) => false,
    }
}

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

/// Every event of `chat` as node `addr` serves it (linearizable history, paged).
async fn full_history(client: &Client, chat: u64) -> Vec<v1::Event> {
    let deadline = Instant::now() + WAIT;
    let mut all: Vec<v1::Event> = Vec::new();
    loop {
        let from = all.last().map_or(1, |e| e.seq + 1);
        let page = client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: from,
                direction: v1::Direction::Forward.into(),
                limit: 100,
            })
            .await;
        match page {
            Ok(page) => {
                let more = page.has_more;
                all.extend(page.events);
                if !more {
                    return all;
                }
            }
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("history of chat {chat} from {from}: {e}"),
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

fn seed() -> u64 {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set CHATLOG_TEST_SEED={seed} to repeat)");
    seed
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
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let mut cluster = Cluster::start();
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
        let events = full_history(c, chat).await;
        assert_eq!(events.len(), 16, "node {} reads every send at once", i + 1);
        check_events(i as u64 + 1, &events, &acked);
    }

    // Writers: each user gets clients on every node and keeps sending.
    let (leader, term) = cluster.leader(group, 0);
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
        let events = full_history(&c, chat).await;
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
    let _ = seed();
    let messages = std::env::var("CHATLOG_CATCHUP_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CATCHUP_MESSAGES);
    let mut cluster = Cluster::start();
    let (alice, token, a) = account(&cluster.addr(1), "alice").await;
    let chat = group_chat(&a, Vec::new()).await;
    let group = group_of(chat);
    let (leader, _) = cluster.leader(group, 0);
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
    let deadline = Instant::now() + WAIT;
    loop {
        match c
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: 0,
                direction: v1::Direction::Backward.into(),
                limit: 1,
            })
            .await
        {
            Ok(page) if page.head_seq == head => break,
            Ok(page) => eprintln!("node {follower} at head {} of {head}", page.head_seq),
            Err(e) if retryable(&e) => eprintln!("node {follower} not ready: {e}"),
            Err(e) => panic!("history on node {follower}: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "node {follower} did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "node {follower} caught up {messages} messages in {:?} after its restart",
        restarted.elapsed()
    );
    // Its copy matches the leader's, event for event.
    let on_follower = full_history(&c, chat).await;
    let on_leader = full_history(&clients[0], chat).await;
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
