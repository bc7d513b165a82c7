//! Chaos: three real `chatlog serve` processes under seeded random faults while writers
//! on every node keep sending, then every chat read from every node and checked by the
//! history checkers (`tests/common/history.rs`).
//!
//! Faults, one at a time (one time in four with a second at once on another node: its
//! links slowed or cut one way; `CHATLOG_CHAOS_MULTI=0` turns that off), each followed by
//! a heal and a short calm:
//! - SIGKILL of a node (the leader of a written group more often than not), restarted on
//!   the same data directory and addresses after a while;
//! - SIGSTOP of a node, SIGCONT after a while;
//! - network faults between nodes through a fault-injecting TCP proxy the test runs in
//!   front of every node's peer port (`--initial-cluster` names the proxies, each node
//!   listens on its own `--peer-listen`): a node isolated by a blackhole (bytes held, not
//!   delivered, new connections hang), isolated by a cut (connections closed, new ones
//!   hang), isolated one way (its outgoing bytes held), or its links slowed by a delay.
//!   The proxy learns which node dialled from the first frame (`NodeFrame.from_node_id`
//!   of the hello), so faults apply per pair of nodes.
//!
//! Pauses (SIGSTOP/SIGCONT) are on by default; `CHATLOG_CHAOS_PAUSE=0` replaces them by
//! kills. They found a real bug: the stop/continue interrupted the storage I/O thread's
//! `io_uring_enter` wait with EINTR, which the engine took for a failed write and stopped
//! for good (seed 9688907112488499028; fixed in `storage/src/io.rs`, see
//! `docs/reliability.md`).
//!
//! Writers record every send (acknowledged with seq, refused with code, unknown) and
//! reads made after acknowledgements; a few sends are deliberately repeated with the
//! same client message id through another node. After the fault window everything is
//! healed, the writers stop, every chat is read from every node, and every checker must
//! find nothing.
//!
//! The seed is printed; `CHATLOG_TEST_SEED` replays the fault schedule and the writers'
//! choices (timing still varies: these are real processes). `CHATLOG_CHAOS_SECS` sets the
//! length of the fault window (default 20 s, ~35 s for the whole test); `scripts/soak`
//! runs the test repeatedly for as long as asked.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/history.rs"]
mod history;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::{Client, ClientError, ClientOptions, ReconnectPolicy};
use chatlog_wire::limits::NODE_FRAME_BYTES_MAX;
use chatlog_wire::proto::node::v1::NodeFrame;
use chatlog_wire::proto::v1::{self, ErrorCode, event::Body};
use cluster::{Cluster, Options};
use history::{Event, History, Outcome, Read, Send};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NODES: u64 = 3;
const CHATS: usize = 4;
const LANES_PER_USER: u64 = 2;
/// Default length of the fault window.
const CHAOS_SECS: u64 = 20;
/// Longest a node may take to announce its client address.
const START_WAIT: Duration = Duration::from_secs(60);
/// Longest one send keeps retrying before its outcome is recorded as unknown.
const OP_WAIT: Duration = Duration::from_secs(20);
/// Limit on one attempt of one request.
const ATTEMPT_WAIT: Duration = Duration::from_secs(3);

// ---- The fault-injecting proxy --------------------------------------------------------

/// State of the bytes flowing from one node to another (both connections of the pair
/// carry such bytes: requests one way, responses the other).
#[derive(Debug, Default, Clone, Copy)]
struct Link {
    /// Each chunk waits this long before it is forwarded.
    delay_ms: u64,
    /// Bytes are held (not read further, not delivered) and new connections hang.
    blackhole: bool,
    /// Bumped by a cut: connections opened under an older epoch close.
    epoch: u64,
}

#[derive(Debug, Default)]
struct Net {
    links: Mutex<HashMap<(u64, u64), Link>>,
}

impl Net {
    fn link(&self, from: u64, to: u64) -> Link {
        self.links
            .lock()
            .unwrap()
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }

    fn update(&self, from: u64, to: u64, f: impl FnOnce(&mut Link)) {
        f(self.links.lock().unwrap().entry((from, to)).or_default());
    }

    /// Every link of `node` (both directions unless `one_way`, then only its outgoing).
    fn each_link_of(&self, node: u64, one_way: bool, f: impl Fn(&mut Link)) {
        for other in (1..=NODES).filter(|o| *o != node) {
            self.update(node, other, &f);
            if !one_way {
                self.update(other, node, &f);
            }
        }
    }

    fn heal(&self) {
        for link in self.links.lock().unwrap().values_mut() {
            link.delay_ms = 0;
            link.blackhole = false;
        }
    }
}

/// Accepts connections meant for node `to` and relays them to its real peer address.
async fn run_proxy(listener: TcpListener, to: u64, upstream: SocketAddr, net: Arc<Net>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let net = Arc::clone(&net);
        tokio::spawn(async move {
            let _ = relay(conn, to, upstream, net).await;
        });
    }
}

async fn relay(
    mut conn: TcpStream,
    to: u64,
    upstream: SocketAddr,
    net: Arc<Net>,
) -> std::io::Result<()> {
    // The hello tells who dialled.
    let mut prefix = [0u8; 4];
    conn.read_exact(&mut prefix).await?;
    let len = u32::from_le_bytes(prefix);
    if len == 0 || len > NODE_FRAME_BYTES_MAX {
        return Ok(());
    }
    let mut first = vec![0u8; len as usize];
    conn.read_exact(&mut first).await?;
    let from = NodeFrame::decode(&first[..]).map_or(0, |f| f.from_node_id);
    let epoch = net.link(from, to).epoch;
    // A blackholed pair: the connection hangs until healed (or cut).
    loop {
        let l = net.link(from, to);
        if l.epoch != epoch {
            return Ok(());
        }
        if !l.blackhole {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    conn.set_nodelay(true)?;
    up.write_all(&prefix).await?;
    up.write_all(&first).await?;
    let (mut cr, mut cw) = conn.into_split();
    let (mut ur, mut uw) = up.into_split();
    let forward = pump(&mut cr, &mut uw, &net, (from, to), epoch);
    let backward = pump(&mut ur, &mut cw, &net, (to, from), epoch);
    // Either side ending (or a cut) closes both.
    tokio::select! {
        _ = forward => {}
        _ = backward => {}
    }
    Ok(())
}

async fn pump(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    net: &Net,
    (from, to): (u64, u64),
    epoch: u64,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Notice a cut even on an idle connection.
            _ = async {
                while net.link(from, to).epoch == epoch {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } => return,
        };
        let delay = loop {
            let l = net.link(from, to);
            if l.epoch != epoch {
                return;
            }
            if !l.blackhole {
                break l.delay_ms;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---- The processes --------------------------------------------------------------------

/// Starts the proxies and three nodes whose `--initial-cluster` names the proxies; each
/// node listens for peers on its own `--peer-listen` behind its proxy.
async fn start_cluster(net: &Arc<Net>) -> Cluster {
    let mut routes = Vec::new();
    for id in 1..=NODES {
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let peer_listen: SocketAddr = format!("127.0.0.1:{}", cluster::free_port())
            .parse()
            .expect("address");
        routes.push((peer_listen, proxy.local_addr().expect("proxy address")));
        tokio::spawn(run_proxy(proxy, id, peer_listen, Arc::clone(net)));
    }
    let options = Options {
        nodes: NODES,
        http: true,
        peer_routes: Some(routes),
        ..Options::default()
    };
    tokio::task::block_in_place(|| Cluster::start(options))
}

// ---- Clients --------------------------------------------------------------------------

fn options(token: Option<String>) -> ClientOptions {
    ClientOptions {
        token,
        connect_timeout: Duration::from_secs(1),
        request_timeout: ATTEMPT_WAIT,
        // Redial once per call: the writers move to another node themselves.
        reconnect: ReconnectPolicy {
            attempts_max: 1,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
        },
        // Every attempt is the test's own, so it knows what it sent.
        retries_max: 0,
        ..ClientOptions::default()
    }
}

async fn connect(addr: &str, token: Option<String>) -> Client {
    let deadline = Instant::now() + START_WAIT;
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

/// Retries a setup call (no faults yet, but elections may still settle).
async fn setup<T, F: Future<Output = Result<T, ClientError>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + START_WAIT;
    loop {
        match f().await {
            Ok(t) => return t,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

async fn account(addr: &str, name: &str) -> (u64, String) {
    let c = connect(addr, None).await;
    let created = setup("create user", || {
        c.create_user(v1::CreateUserRequest { name: name.into() })
    })
    .await;
    let login = setup("login", || {
        c.login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token.clone(),
            device_id: "dev".into(),
            device_name: format!("{name}'s device"),
        })
    })
    .await;
    (created.user_id, login.session_token)
}

fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => matches!(
            code,
            ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::RateLimited
        ),
        ClientError::Timeout | ClientError::Disconnected | ClientError::Io(_) => true,
        ClientError::Protocol(_) | ClientError::Encode(_) | ClientError::LocalFile { .. } => false,
    }
}

fn to_event(e: &v1::Event) -> Event {
    match &e.body {
        Some(Body::MessagePosted(m)) => Event {
            seq: e.seq,
            sender: e.sender_id,
            cmid: Some(m.client_message_id),
            text: m.text.clone(),
        },
        other => Event {
            seq: e.seq,
            sender: e.sender_id,
            cmid: None,
            text: format!("{other:?}"),
        },
    }
}

/// Run-wide counters and the time of every acknowledgement.
#[derive(Debug, Default)]
struct Stats {
    attempts: AtomicU64,
    protocol_errors: AtomicU64,
    reads_failed: AtomicU64,
    /// (chat, when) of every acknowledgement.
    acks: Mutex<Vec<(u64, Instant)>>,
}

/// One send: tries node after node with the same client message id until acknowledged,
/// definitely refused, or out of time; records the outcome.
#[allow(clippy::too_many_arguments)]
async fn send_op(
    h: &History,
    stats: &Stats,
    clients: &[Client],
    start: usize,
    chat: u64,
    sender: u64,
    cmid: u64,
    text: &str,
) -> Outcome {
    let invoked = h.tick();
    let deadline = Instant::now() + OP_WAIT;
    let mut maybe_applied = false;
    let mut at = start;
    let outcome = loop {
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        let c = &clients[at % clients.len()];
        let req = v1::SendMessageRequest {
            chat_id: chat,
            client_message_id: cmid,
            text: text.into(),
            media: None,
            reply_to_seq: 0,
        };
        match tokio::time::timeout(ATTEMPT_WAIT + Duration::from_secs(1), c.send_message(req)).await
        {
            Ok(Ok(r)) => {
                stats.acks.lock().unwrap().push((chat, Instant::now()));
                break Outcome::Acked { seq: r.seq };
            }
            Ok(Err(e)) if retryable(&e) => maybe_applied = true,
            Ok(Err(ClientError::Server { code, .. })) => {
                break if maybe_applied {
                    Outcome::Unknown
                } else {
                    Outcome::Refused {
                        code: format!("{code:?}"),
                    }
                };
            }
            Ok(Err(e)) => {
                eprintln!("send {text:?}: {e}");
                stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                maybe_applied = true;
            }
            Err(_) => maybe_applied = true,
        }
        if Instant::now() > deadline {
            break Outcome::Unknown;
        }
        at += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    h.record_send(Send {
        chat,
        sender,
        cmid,
        text: text.into(),
        outcome: outcome.clone(),
        invoked,
        completed: h.tick(),
    });
    outcome
}

/// A linearizable read of the newest events of `chat` on one node, recorded.
async fn read_op(h: &History, stats: &Stats, client: &Client, node: u64, chat: u64) {
    let invoked = h.tick();
    let page = tokio::time::timeout(
        ATTEMPT_WAIT + Duration::from_secs(1),
        client.history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 0,
            direction: v1::Direction::Backward.into(),
            limit: 5,
        }),
    )
    .await;
    match page {
        Ok(Ok(page)) => h.record_read(Read {
            chat,
            node,
            invoked,
            head_seq: page.head_seq,
            events: page.events.iter().map(to_event).collect(),
        }),
        _ => {
            stats.reads_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Every event of `chat` as one node serves it, paged; the error if the node cannot answer.
async fn full_history(client: &Client, chat: u64) -> Result<Vec<v1::Event>, String> {
    let mut all: Vec<v1::Event> = Vec::new();
    loop {
        let from = all.last().map_or(1, |e| e.seq + 1);
        let page = tokio::time::timeout(
            ATTEMPT_WAIT + Duration::from_secs(1),
            client.history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: from,
                direction: v1::Direction::Forward.into(),
                limit: 100,
            }),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let more = page.has_more;
        all.extend(page.events);
        if !more {
            return Ok(all);
        }
    }
}

// ---- Faults ---------------------------------------------------------------------------

/// Runs seeded faults until `until`, healing after each (one time in four with a second
/// fault on another node at the same time); returns how many of each kind were injected.
fn inject_faults(
    cluster: &mut Cluster,
    net: &Net,
    rng: &mut StdRng,
    groups: &[u64],
    until: Instant,
) -> BTreeMap<&'static str, u64> {
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    let started = Instant::now();
    let pauses = std::env::var("CHATLOG_CHAOS_PAUSE").map_or(true, |v| v != "0");
    let multi = std::env::var("CHATLOG_CHAOS_MULTI").map_or(true, |v| v != "0");
    while Instant::now() < until {
        let random_node = rng.random_range(1..=NODES);
        let group = groups[rng.random_range(0..groups.len())];
        let leader = cluster.last_leader(group).unwrap_or(random_node);
        // Leaders more often: the node that leads a written group, two times in three.
        let victim = if rng.random_bool(2.0 / 3.0) {
            leader
        } else {
            random_node
        };
        let hold = ms(rng, 800, 3000);
        let kind = match rng.random_range(0..100) {
            0..30 => "kill -9",
            30..45 if pauses => "pause (SIGSTOP)",
            30..45 => "kill -9",
            45..60 => "partition (blackhole)",
            60..72 => "partition (cut)",
            72..84 => "partition (one way)",
            _ => "delay",
        };
        eprintln!(
            "[chaos] t+{:?}: {kind} on node {victim} for {hold:?}",
            started.elapsed()
        );
        *faults.entry(kind).or_default() += 1;
        // Several faults at once: one time in four, a second node's links are slowed or
        // cut one way for the same time (two of three nodes impaired: a group may lose
        // its majority for a while, which costs availability, never data).
        if multi && rng.random_bool(0.25) {
            let other = (victim % NODES) + 1;
            let second = if rng.random_bool(0.5) {
                let delay = rng.random_range(20..250);
                net.each_link_of(other, false, |l| l.delay_ms = delay);
                "also: delay"
            } else {
                net.each_link_of(other, true, |l| l.blackhole = true);
                "also: partition (one way)"
            };
            eprintln!("[chaos]   and at once: {second} on node {other}");
            *faults.entry(second).or_default() += 1;
        }
        match kind {
            "kill -9" => {
                cluster.kill(victim);
                std::thread::sleep(hold);
                cluster.restart(victim);
            }
            "pause (SIGSTOP)" => {
                cluster.pause(victim);
                std::thread::sleep(hold);
                cluster.resume(victim);
            }
            "partition (blackhole)" => {
                net.each_link_of(victim, false, |l| l.blackhole = true);
                std::thread::sleep(hold);
            }
            "partition (cut)" => {
                net.each_link_of(victim, false, |l| {
                    l.blackhole = true;
                    l.epoch += 1;
                });
                std::thread::sleep(hold);
            }
            "partition (one way)" => {
                net.each_link_of(victim, true, |l| l.blackhole = true);
                std::thread::sleep(hold);
            }
            _ => {
                let delay = rng.random_range(20..250);
                eprintln!("[chaos] delay {delay} ms per chunk");
                net.each_link_of(victim, false, |l| l.delay_ms = delay);
                std::thread::sleep(hold);
            }
        }
        net.heal();
        std::thread::sleep(ms(rng, 300, 1200));
    }
    faults
}

// ---- The test -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kills_pauses_and_partitions() {
    let started = Instant::now();
    let seed = cluster::seed();
    let secs = std::env::var("CHATLOG_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CHAOS_SECS);
    let mut rng = StdRng::seed_from_u64(seed);
    let net = Arc::new(Net::default());
    let mut cluster = start_cluster(&net).await;
    eprintln!("cluster up in {:?}", started.elapsed());

    // One user per node; every user is in every chat.
    let mut users = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        users.push(account(&cluster.addr(i as u64 + 1), name).await);
    }
    let ids: Vec<u64> = users.iter().map(|u| u.0).collect();
    let mut chats = Vec::new();
    for i in 0..CHATS {
        // Chats live in their creator's group: spread the creators.
        let creator = i % users.len();
        let owner = connect(
            &cluster.addr(creator as u64 + 1),
            Some(users[creator].1.clone()),
        )
        .await;
        let members: Vec<u64> = ids.iter().copied().filter(|u| *u != ids[creator]).collect();
        let chat = setup("create chat", || {
            owner.create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: format!("chaos {i}"),
                member_ids: members.clone(),
            })
        })
        .await
        .chat_id;
        chats.push(chat);
    }
    let mut groups: Vec<u64> = chats.iter().map(|c| group_of(*c)).collect();
    groups.sort();
    groups.dedup();
    eprintln!("chats {chats:?} in groups {groups:?}");

    // Writers: every user, on clients to every node, starting on different nodes.
    let history = Arc::new(History::default());
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut clients_by_user = Vec::new();
    for (u, (user, token)) in users.iter().enumerate() {
        let mut clients = Vec::new();
        for id in 1..=NODES {
            clients.push(connect(&cluster.addr(id), Some(token.clone())).await);
        }
        clients_by_user.push(clients.clone());
        for lane in 0..LANES_PER_USER {
            let (h, stats, stop, clients, chats) = (
                Arc::clone(&history),
                Arc::clone(&stats),
                Arc::clone(&stop),
                clients.clone(),
                chats.clone(),
            );
            let user = *user;
            let mut rng = StdRng::seed_from_u64(seed ^ (u as u64 * 16 + lane + 1));
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let chat = chats[rng.random_range(0..chats.len())];
                    let cmid = (lane + 1) * 1_000_000 + i;
                    let text = format!("u{u}.l{lane}:{i}");
                    let start = rng.random_range(0..clients.len());
                    let outcome =
                        send_op(&h, &stats, &clients, start, chat, user, cmid, &text).await;
                    if matches!(outcome, Outcome::Acked { .. }) {
                        if rng.random_bool(0.25) {
                            let node = rng.random_range(0..clients.len());
                            read_op(&h, &stats, &clients[node], node as u64 + 1, chat).await;
                        }
                        // A deliberate repeat through another node: same id, same seq.
                        if rng.random_bool(0.1) {
                            send_op(&h, &stats, &clients, start + 1, chat, user, cmid, &text).await;
                        }
                    }
                    i += 1;
                }
            }));
        }
    }

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = history.sends.lock().unwrap().len();
    assert!(before > 0, "writers make progress before any fault");
    let window_started = Instant::now();
    let until = window_started + Duration::from_secs(secs);
    eprintln!("[chaos] fault window of {secs} s starts after {before} sends");
    let (cluster, faults) = {
        let net = Arc::clone(&net);
        let groups = groups.clone();
        tokio::task::spawn_blocking(move || {
            let faults = inject_faults(&mut cluster, &net, &mut rng, &groups, until);
            (cluster, faults)
        })
        .await
        .expect("fault injector")
    };
    let window = window_started.elapsed();
    // Everything healed (the injector heals after each fault): let writers run on a healthy
    // cluster for a while, then stop them.
    net.heal();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let writers_done = Instant::now();

    // Read every chat from every node; linearizable reads on a healed cluster agree, but
    // a node just restarted may need a moment to answer.
    let deadline = Instant::now() + START_WAIT;
    for chat in &chats {
        for id in 1..=NODES {
            let client = &clients_by_user[0][(id - 1) as usize];
            let events = loop {
                let error = match full_history(client, *chat).await {
                    Ok(events) => break events,
                    Err(e) => e,
                };
                assert!(
                    Instant::now() < deadline,
                    "seed {seed}: node {id} cannot serve chat {chat} after healing: {error}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            history.record_log(id, *chat, events.iter().map(to_event).collect());
        }
    }
    // Leave the processes running until the reads are done, then stop them.
    drop(cluster);

    // Figures.
    let sends = history.sends.lock().unwrap().clone();
    let count = |f: &dyn Fn(&Outcome) -> bool| sends.iter().filter(|s| f(&s.outcome)).count();
    let acked = count(&|o| matches!(o, Outcome::Acked { .. }));
    let refused = count(&|o| matches!(o, Outcome::Refused { .. }));
    let unknown = count(&|o| matches!(o, Outcome::Unknown));
    let reads = history.reads.lock().unwrap().len();
    let events: usize = history
        .logs
        .lock()
        .unwrap()
        .values()
        .flat_map(|c| c.values())
        .map(Vec::len)
        .sum();
    let mut acks = stats.acks.lock().unwrap().clone();
    acks.sort_by_key(|(_, t)| *t);
    let gap = |times: &mut dyn Iterator<Item = Instant>| {
        let mut prev = window_started;
        let mut longest = Duration::ZERO;
        for t in times.chain([writers_done]) {
            if t >= window_started {
                longest = longest.max(t.duration_since(prev));
                prev = t;
            }
        }
        longest
    };
    let longest_any = gap(&mut acks.iter().map(|(_, t)| *t));
    let longest_chat = chats
        .iter()
        .map(|c| gap(&mut acks.iter().filter(|(x, _)| x == c).map(|(_, t)| *t)))
        .max()
        .unwrap_or_default();
    let results = history::check_all(&history);
    let lost = results[0].1.len();
    eprintln!("---- chaos figures (seed {seed}) ----");
    eprintln!("fault window             {window:?}");
    eprintln!("faults                   {faults:?}");
    eprintln!(
        "sends                    {} ({acked} acknowledged, {refused} refused, {unknown} unknown; {} attempts)",
        sends.len(),
        stats.attempts.load(Ordering::Relaxed)
    );
    eprintln!(
        "reads after an ack       {reads} recorded, {} failed (not checked)",
        stats.reads_failed.load(Ordering::Relaxed)
    );
    eprintln!("events read at the end   {events} (all chats, all nodes)");
    eprintln!("acknowledged writes lost {lost}");
    eprintln!("longest time without any acknowledgement: {longest_any:?}");
    eprintln!("longest time without an acknowledgement in one chat: {longest_chat:?}");
    let mut failed = Vec::new();
    for (name, violations) in &results {
        eprintln!("{name}: {} violations", violations.len());
        for v in violations.iter().take(20) {
            eprintln!("  {v}");
        }
        if !violations.is_empty() {
            failed.push(*name);
        }
    }
    eprintln!("test took {:?}", started.elapsed());
    assert!(
        failed.is_empty(),
        "seed {seed}: violated {failed:?} (details above)"
    );
    assert_eq!(
        stats.protocol_errors.load(Ordering::Relaxed),
        0,
        "seed {seed}: protocol errors"
    );
    assert!(acked > 50, "seed {seed}: only {acked} sends acknowledged");
}
