//! The gateway must not be the bottleneck of the replicated core (issue "The client
//! protocol, gateway, client library and CLI"): single-node durable throughput through
//! the protocol (256-byte messages, 4 connections × 64 in flight, 1,000 chats) against
//! the core's in-process throughput measured in the same run, and serial latency
//! (1 connection, 1 in flight).
//!
//! `cargo bench --bench gateway_figures`. `CHATLOG_GW_SECS` (default 5) per run,
//! `CHATLOG_GW_REPEATS` (default 3) runs alternating gateway and in-process, medians
//! reported. Everything runs in this process: the server (node + gateway on
//! 127.0.0.1), and the clients, which therefore share the 2 cores with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog::gateway::{self, GatewayLimits};
use chatlog::service::ChatService;
use chatlog_raft::chat::{Command, Outcome};
use chatlog_raft::node::{NoPeers, Node, NodeConfig};
use chatlog_wire::client::{Client, ClientOptions};
use chatlog_wire::proto::v1;
use hdrhistogram::Histogram;

const GROUPS: u64 = 16;
const CHATS: usize = 1_000;
const CONNECTIONS: usize = 4;
const IN_FLIGHT: usize = 64;
const TEXT_BYTES: usize = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn text() -> String {
    "x".repeat(TEXT_BYTES)
}

struct Setup {
    node: Arc<Node>,
    addr: String,
    /// (session token, user id) per connection.
    users: Vec<(String, u64)>,
    /// The chats of each connection's user.
    chats: Vec<Vec<u64>>,
    stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(
        NodeConfig::single(dir.path(), GROUPS),
        |_| NoPeers,
        Default::default(),
    )
    .await
    .expect("node");
    node.wait_for_leaders(Duration::from_secs(30))
        .await
        .expect("leaders");
    let node = Arc::new(node);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let service = Arc::new(ChatService::with_limits(
        Arc::clone(&node),
        true,
        // A load generator measures the server, not its rate limits.
        chatlog::service::ratelimit::RateLimits {
            user_sends_per_sec: 0.0,
            conn_requests_per_sec: 0.0,
        },
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway::serve(
        listener,
        service,
        GatewayLimits::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let anon = Client::connect(&addr, ClientOptions::default())
        .await
        .expect("connect");
    let mut users = Vec::new();
    for i in 0..CONNECTIONS {
        let created = anon
            .create_user(v1::CreateUserRequest {
                name: format!("bench_{i}"),
            })
            .await
            .expect("user");
        let login = anon
            .login(v1::LoginRequest {
                user_id: created.user_id,
                login_token: created.login_token,
                device_id: format!("bench{i}"),
                device_name: String::new(),
            })
            .await
            .expect("login");
        users.push((login.session_token, created.user_id));
    }
    // Each connection's user owns a quarter of the chats, alone: every post is then
    // pushed once, to its sender's own connection (live fan-out to the sender's devices),
    // and the figure is the protocol's cost, not a fan-out multiple of it (members on
    // other connections would each receive every post too).
    let mut chats = vec![Vec::new(); CONNECTIONS];
    for (c, (token, _)) in users.iter().enumerate() {
        let owner = Client::connect(
            &addr,
            ClientOptions {
                token: Some(token.clone()),
                ..ClientOptions::default()
            },
        )
        .await
        .expect("connect");
        for i in 0..CHATS / CONNECTIONS {
            let chat = owner
                .create_chat(v1::CreateChatRequest {
                    kind: v1::ChatKind::Group.into(),
                    title: format!("chat {c}.{i}"),
                    member_ids: vec![],
                })
                .await
                .expect("chat");
            chats[c].push(chat.chat_id);
        }
    }
    Setup {
        node,
        addr,
        users,
        chats,
        stop,
        _dir: dir,
    }
}

/// Posts through the protocol: `conns` connections × `in_flight` callers each.
async fn through_gateway(
    s: &Setup,
    conns: usize,
    in_flight: usize,
    secs: u64,
) -> (f64, Histogram<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let client = Client::connect(
            &s.addr,
            ClientOptions {
                token: Some(s.users[c].0.clone()),
                ..ClientOptions::default()
            },
        )
        .await
        .expect("connect");
        for w in 0..in_flight {
            let client = client.clone();
            let chats = s.chats[c].clone();
            let (stop, measuring, done) =
                (Arc::clone(&stop), Arc::clone(&measuring), Arc::clone(&done));
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).expect("hist");
                let mut k = (c * 997 + w * 7919) % chats.len();
                let mut id = ((c * in_flight + w) as u64) << 32;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 104_729) % chats.len();
                    id += 1;
                    let t = Instant::now();
                    client
                        .send_message(v1::SendMessageRequest {
                            chat_id: chats[k],
                            client_message_id: id,
                            text: text(),
                            media: None,
                            reply_to_seq: 0,
                        })
                        .await
                        .expect("send");
                    if measuring.load(Ordering::Relaxed) {
                        hist.record(t.elapsed().as_micros() as u64).expect("record");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                hist
            }));
        }
    }
    measure(tasks, stop, measuring, done, secs).await
}

/// The same load straight into the node (no protocol, no sockets).
async fn in_process(s: &Setup, callers: usize, secs: u64) -> (f64, Histogram<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..callers {
        let node = Arc::clone(&s.node);
        let chats = s.chats[w % s.users.len()].clone();
        let sender = s.users[w % s.users.len()].1;
        let (stop, measuring, done) =
            (Arc::clone(&stop), Arc::clone(&measuring), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("hist");
            let mut k = (w * 7919) % chats.len();
            let mut id = (1u64 << 62) + ((w as u64) << 32);
            while !stop.load(Ordering::Relaxed) {
                k = (k + 104_729) % chats.len();
                id += 1;
                let chat = chats[k];
                let t = Instant::now();
                let g = chatlog_raft::chat::group_of(chat);
                let out = node
                    .group(g)
                    .expect("group")
                    .propose(Command::Post {
                        chat,
                        sender,
                        client_message_id: id,
                        text: text(),
                        media: None,
                        reply_to: 0,
                    })
                    .await
                    .expect("post");
                assert!(matches!(out, Outcome::Event { .. }), "{out:?}");
                if measuring.load(Ordering::Relaxed) {
                    hist.record(t.elapsed().as_micros() as u64).expect("record");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            hist
        }));
    }
    measure(tasks, stop, measuring, done, secs).await
}

async fn measure(
    tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    secs: u64,
) -> (f64, Histogram<u64>) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3).expect("hist");
    for t in tasks {
        hist.add(t.await.expect("worker")).expect("merge");
    }
    (rate, hist)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let secs = env_u64("CHATLOG_GW_SECS", 5);
    let repeats = env_u64("CHATLOG_GW_REPEATS", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = setup().await;
        let (mut gw, mut core, mut serial, mut serial_core) = (vec![], vec![], vec![], vec![]);
        let mut gw_p99 = vec![];
        for r in 0..repeats {
            let (rate, hist) = through_gateway(&s, CONNECTIONS, IN_FLIGHT, secs).await;
            eprintln!("run {r}: gateway {rate:.0}/s p99 {:.2} ms", ms(hist.value_at_quantile(0.99)));
            gw.push(rate);
            gw_p99.push(ms(hist.value_at_quantile(0.99)));
            let (rate, _) = in_process(&s, CONNECTIONS * IN_FLIGHT, secs).await;
            eprintln!("run {r}: in-process {rate:.0}/s");
            core.push(rate);
            let (_, hist) = through_gateway(&s, 1, 1, secs).await;
            serial.push(ms(hist.value_at_quantile(0.5)));
            eprintln!("run {r}: serial p50 {:.3} ms", ms(hist.value_at_quantile(0.5)));
            let (_, hist) = in_process(&s, 1, secs).await;
            serial_core.push(ms(hist.value_at_quantile(0.5)));
        }
        let (g, c) = (median(gw), median(core));
        println!("| load | through the gateway | in-process core | ratio |");
        println!("|---|---|---|---|");
        println!(
            "| 4 conns × 64 in flight, 256 B, 1,000 chats, 16 groups, posts/s (median of {repeats}) | {g:.0} (p99 {:.2} ms) | {c:.0} | {:.0}% |",
            median(gw_p99),
            100.0 * g / c
        );
        println!(
            "| 1 conn × 1 in flight, p50 ms (median of {repeats}) | {:.3} | {:.3} | |",
            median(serial),
            median(serial_core)
        );
        let _ = s.stop.send(());
    });
}
