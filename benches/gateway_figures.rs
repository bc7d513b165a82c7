//! The gateway must not be the bottleneck of the replicated core (issue "The client
//! protocol, gateway, client library and CLI"): single-node durable throughput through
//! the protocol (256-byte messages, 4 connections × 64 in flight, 1,000 chats) against
//! the core's in-process throughput measured in the same run, and serial latency
//! (1 connection, 1 in flight).
//!
//! `cargo bench --bench gateway_figures`. `CHATLOG_GW_SECS` (default 5) per run,
//! `CHATLOG_GW_REPEATS` (default 3) runs alternating gateway and in-process, medians
//! reported. The server (node + gateway on 127.0.0.1) runs in this process; the
//! gateway's clients run in this process too (the first column: same process, same
//! cores), and again as a separate load-generator process (this binary started again
//! with `CHATLOG_GW_LOADGEN_ADDR` set; the second column: the clients' CPU is then not
//! the server process's, though the cores are still shared). A third run repeats the
//! first with the clients' handshakes setting `no_live_pushes` (a sender that takes no
//! live pushes, as a bot or the CLI's `send`): each chat's only member is its poster, so
//! that run has no fan-out at all, like the in-process core; the load generator runs
//! without live pushes too. CPU per post is the process's CPU time (`getrusage`) over
//! the posts acknowledged in the same interval: with a separate load generator, the
//! server's CPU per post without live pushes against the core's is what the protocol
//! itself costs the server, whatever the clients cost. Each run line also gives the
//! posts acknowledged per fdatasync of the node's engine and per Raft entry: throughput
//! is the syncs' pace times their batch, and posts held outside the core (in clients,
//! sockets, answer queues) are posts missing from its batches. `CHATLOG_GW_RUNS` picks and orders the
//! runs of a repeat (see [`RUN_KINDS`]).

// The server's allocator (root Cargo.toml, `tikv-jemallocator`: why).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

/// CPU time of this process so far (user + system), in µs.
fn cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid one.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// One measured run: posts per second, latencies, and the CPU µs per post of this
/// process over the measured interval.
struct Run {
    rate: f64,
    hist: Histogram<u64>,
    cpu_us_per_post: f64,
    /// Posts acknowledged per fdatasync of the node's engine over the interval (how
    /// well group commit batched them), and per Raft entry appended (how well each
    /// group's batcher did), where this process runs the node.
    posts_per_sync: Option<(f64, f64)>,
}

/// The node of this process (the server's; unset in a load generator), for its
/// engine's sync count in [`measure`].
static NODE: std::sync::OnceLock<Arc<Node>> = std::sync::OnceLock::new();

/// The node's engine's fdatasyncs so far, and the Raft entries its groups hold.
fn syncs() -> Option<(u64, u64)> {
    NODE.get().map(|node| {
        let entries = node
            .groups()
            .iter()
            .map(|g| {
                openraft::async_runtime::WatchReceiver::borrow_watched(&g.raft().metrics())
                    .last_log_index
                    .unwrap_or(0)
            })
            .sum();
        (node.engine().stats().syncs, entries)
    })
}

/// Posts per sync and per Raft entry between two [`syncs`] readings.
fn batching(posts: f64, start: Option<(u64, u64)>, end: Option<(u64, u64)>) -> Option<(f64, f64)> {
    let ((s0, e0), (s1, e1)) = (start?, end?);
    Some((
        posts / (s1 - s0).max(1) as f64,
        posts / (e1 - e0).max(1) as f64,
    ))
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
    let _ = NODE.set(Arc::clone(&node));
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

/// Numbers the runs of this process (and, passed on, of its load generator): each run's
/// client message ids start at `run << RUN_SHIFT`, so no run repeats an earlier run's
/// (chat, client message id) pairs. Reused ids would be answered from the dedupe
/// window as retries (no new event, no push), not measured as new posts.
static RUN: AtomicU64 = AtomicU64::new(1);
const RUN_SHIFT: u32 = 44;

/// Posts through the protocol: `conns` connections × `in_flight` callers each;
/// `live_pushes` false sets the handshake's `no_live_pushes` (a sender that takes no
/// live pushes: its posts are then not pushed back to it).
async fn through_gateway(
    s: &Setup,
    conns: usize,
    in_flight: usize,
    secs: u64,
    live_pushes: bool,
) -> Run {
    let tokens: Vec<String> = s.users.iter().map(|(token, _)| token.clone()).collect();
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    load(
        &s.addr,
        &tokens,
        &s.chats,
        conns,
        in_flight,
        secs,
        live_pushes,
        run,
    )
    .await
}

/// `conns` client connections to `addr` × `in_flight` callers each, posting to the
/// chats of connection `c`'s user (`chats[c]`, logged in with `tokens[c]`), with the
/// client message ids of run number `run` (see [`RUN`]).
#[allow(clippy::too_many_arguments)] // the load's shape, spelled out at its three callers
async fn load(
    addr: &str,
    tokens: &[String],
    chats: &[Vec<u64>],
    conns: usize,
    in_flight: usize,
    secs: u64,
    live_pushes: bool,
    run: u64,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let client = Client::connect(
            addr,
            ClientOptions {
                token: Some(tokens[c].clone()),
                live_pushes,
                ..ClientOptions::default()
            },
        )
        .await
        .expect("connect");
        for w in 0..in_flight {
            let client = client.clone();
            let chats = chats[c].clone();
            let (stop, measuring, done) =
                (Arc::clone(&stop), Arc::clone(&measuring), Arc::clone(&done));
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).expect("hist");
                let mut k = (c * 997 + w * 7919) % chats.len();
                let mut id = (run << RUN_SHIFT) | ((c * in_flight + w) as u64) << 32;
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
async fn in_process(s: &Setup, callers: usize, secs: u64) -> Run {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
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
            let mut id = (1u64 << 62) | (run << RUN_SHIFT) | ((w as u64) << 32);
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
) -> Run {
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let cpu0 = cpu_us();
    let syncs0 = syncs();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = cpu_us() - cpu0;
    let posts = done.load(Ordering::Relaxed);
    let posts_per_sync = batching(posts as f64, syncs0, syncs());
    let rate = posts as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3).expect("hist");
    for t in tasks {
        hist.add(t.await.expect("worker")).expect("merge");
    }
    Run {
        rate,
        hist,
        cpu_us_per_post: cpu as f64 / posts.max(1) as f64,
        posts_per_sync,
    }
}

/// The gateway load from a separate process: this binary again, as a load generator
/// (see [`loadgen_main`]). Returns the load generator's run (its CPU per post is the
/// load generator's) and this process's (the server's) CPU µs per post over the same
/// measured interval.
async fn through_gateway_separate(s: &Setup, secs: u64, live_pushes: bool) -> (Run, f64) {
    let tokens: Vec<String> = s.users.iter().map(|(token, _)| token.clone()).collect();
    let chats: Vec<String> = s
        .chats
        .iter()
        .map(|c| c.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
        .collect();
    let program = std::env::current_exe().expect("own path");
    let addr = s.addr.clone();
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    // The child is driven from a blocking thread: reading its output must not hold a
    // runtime worker that the server needs.
    let result = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = std::process::Command::new(program)
            .env("CHATLOG_GW_LOADGEN_ADDR", &addr)
            .env("CHATLOG_GW_LOADGEN_TOKENS", tokens.join(" "))
            .env("CHATLOG_GW_LOADGEN_CHATS", chats.join(" "))
            .env("CHATLOG_GW_LOADGEN_RUN", run.to_string())
            .env(
                "CHATLOG_GW_LOADGEN_LIVE",
                u64::from(live_pushes).to_string(),
            )
            .env("CHATLOG_GW_SECS", secs.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the load generator starts");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        // The load generator says when its measured interval starts and ends.
        let (mut cpu0, mut syncs0) = (0, None);
        let mut result = None;
        for line in stdout.lines() {
            let line = line.expect("load generator output");
            if line == "measuring" {
                cpu0 = cpu_us();
                syncs0 = syncs();
            } else if let Some(rest) = line.strip_prefix("done ") {
                let server_cpu = cpu_us() - cpu0;
                let synced = syncs();
                // RATE POSTS P50_US P99_US CPU_US_PER_POST
                let v: Vec<f64> = rest
                    .split(' ')
                    .map(|x| x.parse().expect("number"))
                    .collect();
                let mut hist = Histogram::<u64>::new(3).expect("hist");
                hist.record(v[2] as u64).expect("record");
                result = Some((
                    Run {
                        rate: v[0],
                        hist,
                        cpu_us_per_post: v[4],
                        posts_per_sync: batching(v[1], syncs0, synced),
                    },
                    server_cpu as f64 / v[1].max(1.0),
                    v[3],
                ));
            }
        }
        assert!(
            child.wait().expect("wait").success(),
            "load generator failed"
        );
        result
    })
    .await
    .expect("the load generator's thread");
    let (run, server_cpu, p99_us) = result.expect("the load generator reported");
    SEPARATE_P99_US.store(p99_us as u64, Ordering::Relaxed);
    (run, server_cpu)
}

/// The p99 of the last separate-process run, in µs (its histogram stays in the child).
static SEPARATE_P99_US: AtomicU64 = AtomicU64::new(0);

/// The load generator process: the same load as [`through_gateway`], reporting on
/// stdout `measuring` when its measured interval starts and
/// `done RATE POSTS P50_US P99_US CPU_US_PER_POST` at its end.
fn loadgen_main(addr: String) {
    let secs = env_u64("CHATLOG_GW_SECS", 5);
    let tokens: Vec<String> = std::env::var("CHATLOG_GW_LOADGEN_TOKENS")
        .expect("tokens")
        .split(' ')
        .map(str::to_owned)
        .collect();
    let chats: Vec<Vec<u64>> = std::env::var("CHATLOG_GW_LOADGEN_CHATS")
        .expect("chats")
        .split(' ')
        .map(|c| c.split(',').map(|x| x.parse().expect("chat id")).collect())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let announce = tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            println!("measuring");
        });
        let run = env_u64("CHATLOG_GW_LOADGEN_RUN", 0);
        let live_pushes = env_u64("CHATLOG_GW_LOADGEN_LIVE", 1) != 0;
        let run = load(
            &addr,
            &tokens,
            &chats,
            CONNECTIONS,
            IN_FLIGHT,
            secs,
            live_pushes,
            run,
        )
        .await;
        announce.await.expect("announce");
        let posts = run.rate * secs as f64;
        println!(
            "done {} {} {} {} {}",
            run.rate,
            posts,
            run.hist.value_at_quantile(0.5),
            run.hist.value_at_quantile(0.99),
            run.cpu_us_per_post
        );
    });
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The kinds of run of one repeat, in the order they run: `CHATLOG_GW_RUNS`, a comma list
/// of `live` (clients in this process), `quiet` (the same without live pushes), `core`
/// (in-process), `separate` (load generator in its own process), `separate_quiet` (the
/// same without live pushes: the server then does what the core does, plus the
/// protocol), `serial` (1 × 1 through the gateway and in-process); default all six, in
/// that order. Choosing some (for a profile of one kind) or another order (each run adds
/// ~0.5M posts to the state the next one works on) is for A/B work; the table prints the
/// columns that ran.
const RUN_KINDS: [&str; 6] = [
    "live",
    "quiet",
    "core",
    "separate",
    "separate_quiet",
    "serial",
];

fn run_kinds() -> Vec<&'static str> {
    let Ok(list) = std::env::var("CHATLOG_GW_RUNS") else {
        return RUN_KINDS.to_vec();
    };
    let kinds: Vec<&'static str> = list
        .split(',')
        .map(|k| {
            *RUN_KINDS
                .iter()
                .find(|known| **known == k.trim())
                .unwrap_or_else(|| panic!("CHATLOG_GW_RUNS: {k:?} is none of {RUN_KINDS:?}"))
        })
        .collect();
    assert!(!kinds.is_empty(), "CHATLOG_GW_RUNS names no run");
    kinds
}

/// `part / whole` as a percentage, or a dash when either column did not run.
fn ratio(part: &[f64], whole: &[f64]) -> String {
    if part.is_empty() || whole.is_empty() {
        return "–".into();
    }
    format!(
        "{:.0}%",
        100.0 * median(part.to_vec()) / median(whole.to_vec())
    )
}

/// The median as a figure with `decimals`, or a dash for a column that did not run.
fn fig(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    format!("{:.*}", decimals, median(v.to_vec()))
}

/// ", N posts per sync, M per Raft entry" for a run line, when the run measured them.
fn per_sync(posts_per_sync: Option<(f64, f64)>) -> String {
    posts_per_sync.map_or_else(String::new, |(sync, entry)| {
        format!(", {sync:.1} posts per sync, {entry:.1} per Raft entry")
    })
}

fn main() {
    if let Ok(addr) = std::env::var("CHATLOG_GW_LOADGEN_ADDR") {
        return loadgen_main(addr);
    }
    let secs = env_u64("CHATLOG_GW_SECS", 5);
    let repeats = env_u64("CHATLOG_GW_REPEATS", 3).max(1);
    let kinds = run_kinds();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = setup().await;
        let (mut gw, mut core, mut serial, mut serial_core) = (vec![], vec![], vec![], vec![]);
        let (mut quiet, mut quiet_p99, mut quiet_cpu) = (vec![], vec![], vec![]);
        let (mut gw_p99, mut gw_cpu, mut core_cpu) = (vec![], vec![], vec![]);
        let (mut sep, mut sep_p99, mut sep_server_cpu, mut sep_client_cpu) =
            (vec![], vec![], vec![], vec![]);
        let (mut sepq, mut sepq_p99, mut sepq_server_cpu, mut sepq_client_cpu) =
            (vec![], vec![], vec![], vec![]);
        for r in 0..repeats {
            for kind in &kinds {
                match *kind {
                    "live" => {
                        let run = through_gateway(&s, CONNECTIONS, IN_FLIGHT, secs, true).await;
                        let p99 = ms(run.hist.value_at_quantile(0.99));
                        eprintln!(
                            "run {r}: gateway {:.0}/s p99 {p99:.2} ms, {:.1} µs CPU per post{}",
                            run.rate,
                            run.cpu_us_per_post,
                            per_sync(run.posts_per_sync)
                        );
                        gw.push(run.rate);
                        gw_p99.push(p99);
                        gw_cpu.push(run.cpu_us_per_post);
                    }
                    "quiet" => {
                        let run = through_gateway(&s, CONNECTIONS, IN_FLIGHT, secs, false).await;
                        let p99 = ms(run.hist.value_at_quantile(0.99));
                        eprintln!(
                            "run {r}: gateway, connections without live pushes {:.0}/s p99 \
                             {p99:.2} ms, {:.1} µs CPU per post{}",
                            run.rate,
                            run.cpu_us_per_post,
                            per_sync(run.posts_per_sync)
                        );
                        quiet.push(run.rate);
                        quiet_p99.push(p99);
                        quiet_cpu.push(run.cpu_us_per_post);
                    }
                    "core" => {
                        let run = in_process(&s, CONNECTIONS * IN_FLIGHT, secs).await;
                        eprintln!(
                            "run {r}: in-process {:.0}/s, {:.1} µs CPU per post{}",
                            run.rate,
                            run.cpu_us_per_post,
                            per_sync(run.posts_per_sync)
                        );
                        core.push(run.rate);
                        core_cpu.push(run.cpu_us_per_post);
                    }
                    "separate" => {
                        let (run, server_cpu) = through_gateway_separate(&s, secs, true).await;
                        let p99 = SEPARATE_P99_US.load(Ordering::Relaxed) as f64 / 1000.0;
                        eprintln!(
                            "run {r}: gateway, load generator in its own process {:.0}/s p99 \
                             {p99:.2} ms, server {server_cpu:.1} + load generator {:.1} µs CPU \
                             per post{}",
                            run.rate,
                            run.cpu_us_per_post,
                            per_sync(run.posts_per_sync)
                        );
                        sep.push(run.rate);
                        sep_p99.push(p99);
                        sep_server_cpu.push(server_cpu);
                        sep_client_cpu.push(run.cpu_us_per_post);
                    }
                    "separate_quiet" => {
                        let (run, server_cpu) = through_gateway_separate(&s, secs, false).await;
                        let p99 = SEPARATE_P99_US.load(Ordering::Relaxed) as f64 / 1000.0;
                        eprintln!(
                            "run {r}: gateway, load generator in its own process without live \
                             pushes {:.0}/s p99 {p99:.2} ms, server {server_cpu:.1} + load \
                             generator {:.1} µs CPU per post{}",
                            run.rate,
                            run.cpu_us_per_post,
                            per_sync(run.posts_per_sync)
                        );
                        sepq.push(run.rate);
                        sepq_p99.push(p99);
                        sepq_server_cpu.push(server_cpu);
                        sepq_client_cpu.push(run.cpu_us_per_post);
                    }
                    _ => {
                        let run = through_gateway(&s, 1, 1, secs, true).await;
                        serial.push(ms(run.hist.value_at_quantile(0.5)));
                        eprintln!(
                            "run {r}: serial p50 {:.3} ms",
                            ms(run.hist.value_at_quantile(0.5))
                        );
                        let run = in_process(&s, 1, secs).await;
                        serial_core.push(ms(run.hist.value_at_quantile(0.5)));
                    }
                }
            }
        }
        let c = fig(&core, 0);
        println!("| load | through the gateway | in-process core | ratio |");
        println!("|---|---|---|---|");
        println!(
            "| 4 conns × 64 in flight, 256 B, 1,000 chats, 16 groups, posts/s (median of {repeats}); clients in the server's process | {} (p99 {} ms) | {c} | {} |",
            fig(&gw, 0),
            fig(&gw_p99, 2),
            ratio(&gw, &core)
        );
        println!(
            "| the same, the clients' connections without live pushes (`no_live_pushes`: no post pushed back to its sender) | {} (p99 {} ms, {} µs CPU per post) | {c} | {} |",
            fig(&quiet, 0),
            fig(&quiet_p99, 2),
            fig(&quiet_cpu, 1),
            ratio(&quiet, &core)
        );
        println!(
            "| the same, load generator in its own process | {} (p99 {} ms) | {c} | {} |",
            fig(&sep, 0),
            fig(&sep_p99, 2),
            ratio(&sep, &core)
        );
        println!(
            "| the same, load generator in its own process, without live pushes | {} (p99 {} ms) | {c} | {} |",
            fig(&sepq, 0),
            fig(&sepq_p99, 2),
            ratio(&sepq, &core)
        );
        println!(
            "| CPU µs per post (median): clients in process / server + separate load generator / in-process core | {} | {} + {} | {} |",
            fig(&gw_cpu, 1),
            fig(&sep_server_cpu, 1),
            fig(&sep_client_cpu, 1),
            fig(&core_cpu, 1)
        );
        println!(
            "| CPU µs per post (median), without live pushes: server + separate load generator / in-process core (the core's CPU per post over the server's: {}) | {} + {} | {} | |",
            ratio(&core_cpu, &sepq_server_cpu),
            fig(&sepq_server_cpu, 1),
            fig(&sepq_client_cpu, 1),
            fig(&core_cpu, 1)
        );
        println!(
            "| 1 conn × 1 in flight, p50 ms (median of {repeats}) | {} | {} | |",
            fig(&serial, 3),
            fig(&serial_core, 3)
        );
        let _ = s.stop.send(());
    });
}
