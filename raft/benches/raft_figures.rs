//! Commit throughput and latency of the replicated core (issue "Replicated chat logs"):
//! 256-byte posts to 1,000 chats spread over 16 groups, through `Node` and its proposal
//! batcher, every post acknowledged only after it is durable and applied.
//!
//! `cargo bench -p chatlog-raft --bench raft_figures -- [r1] [r3]` (a bench of this crate,
//! so a change to the core rebuilds only the core before a run):
//! - `r1`: one node, replication factor 1, in this process.
//! - `r3`: three nodes in this process, each with its own engine and data directory,
//!   talking over the real TCP transport on 127.0.0.1 (replication factor 3). One process
//!   stands in for three on this 2-core machine; the transport, fsyncs and Raft work are
//!   the same, the scheduler is shared.
//!
//! - `idle`: three nodes in this process holding 1,001 groups × 3 replicas, idle: CPU and
//!   resident memory per group replica (not in the default set).
//!
//! `CHATLOG_RAFT_IO=syscall|uring` forces the engines' I/O backend (default: io_uring when
//! the kernel allows it, as `chatlog serve --io-backend auto`).
//! `CHATLOG_RAFT_SEGMENT_MB` sets the engine's segment size and `CHATLOG_RAFT_OPEN_RATE`
//! the open loop's rate instead of half the median, `CHATLOG_RAFT_CHECKPOINT_EVERY` the
//! applied entries between two state checkpoints per group (for investigations).
//!
//! Each scenario runs a closed loop (`CHATLOG_RAFT_INFLIGHT` posts in flight, default
//! 2,048) for `CHATLOG_RAFT_SECS` (default 5) after a 1 s warm-up, `CHATLOG_RAFT_REPEATS`
//! times (default 3) on a fresh directory, and reports the median; then an open loop at
//! half the measured throughput for the p99 commit latency target. The open loop's line
//! on stderr splits that latency: each entry's propose-to-applied time on its leader and
//! each engine's write + fdatasync, over the same window (fixed buckets: upper bounds), so
//! time a post spent queued before its entry was proposed shows as the difference.
//!
//! `CHATLOG_RAFT_EXTRA_SLOTS` and `CHATLOG_RAFT_EXTRA_WAIT_US` set the batcher's extra
//! in-flight entries per group and the wait before an entry may use one
//! (`node::set_pipeline`; `CHATLOG_RAFT_EXTRA_SLOTS=0` is session 7's pipeline of two).
//!
//! `CHATLOG_RAFT_WORKERS` sets the runtime's worker threads and `CHATLOG_RAFT_GENERATOR=worker`
//! runs the open loop's generator on them instead of the main thread (experiments).
//!
//! `CHATLOG_RAFT_TIMELINE=PATH` records a timeline of the half-load run
//! (`chatlog_storage::timeline`: every entry's queue, propose, append, write + fdatasync,
//! flush, apply and answer, segment switches, maintenance, checkpoints; 1 ms probes of the
//! tokio runtime and of an OS thread; the load generator's gaps and every late post) and
//! writes it as CSV to `PATH-<scenario>.csv`; `scripts/timeline-report` lays the late
//! windows next to those events.
//!
//! A post that meets a leader change (elections happen on an overloaded host) is asked
//! again of the group's current leader with the same client message id (applied at most
//! once); the number of repeats is printed with each run.
//!
//! R3 on three real processes (through the client protocol, so the gateway's cost is
//! included) is `scripts/r3-processes`.

// The server's allocator (root Cargo.toml, `tikv-jemallocator`: why).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_raft::chat::{ChatKind, Command, Outcome};
use chatlog_raft::network::{GroupDirectory, NodeIdentity, Router};
use chatlog_raft::node::{Group, GroupRegistry, NoPeers, Node, NodeConfig};
use hdrhistogram::Histogram;

const GROUPS: u64 = 16;
const CHATS: usize = 1_000;
const TEXT_BYTES: usize = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let sections: Vec<&str> = if args.is_empty() {
        vec!["r1", "r3"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // `CHATLOG_RAFT_WORKERS`: the runtime's worker threads (default: one per CPU, as a
    // server's). Fewer workers, fewer threads competing for the CPUs with the generator
    // and the engine's I/O thread (an experiment for the half-load tail).
    if let Some(n) = std::env::var("CHATLOG_RAFT_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    let rt = builder.enable_all().build().expect("runtime");
    // `CHATLOG_RAFT_EXTRA_SLOTS` / `CHATLOG_RAFT_EXTRA_WAIT_US`: the batcher's extra
    // in-flight entries per group and the wait before an entry may take one (default
    // `node::ENTRIES_IN_FLIGHT_EXTRA_MAX` and `node::ENTRY_WAIT_EXTRA`; slots 0 is the
    // session-7 pipeline of two).
    let slots = std::env::var("CHATLOG_RAFT_EXTRA_SLOTS").ok();
    let wait = std::env::var("CHATLOG_RAFT_EXTRA_WAIT_US").ok();
    if slots.is_some() || wait.is_some() {
        let slots = slots
            .and_then(|v| v.parse().ok())
            .unwrap_or(chatlog_raft::node::ENTRIES_IN_FLIGHT_EXTRA_MAX);
        let wait = wait
            .and_then(|v| v.parse().ok())
            .map_or(chatlog_raft::node::ENTRY_WAIT_EXTRA, Duration::from_micros);
        chatlog_raft::node::set_pipeline(slots, wait);
    }
    if timeline_path().is_some() {
        chatlog_storage::timeline::enable();
        rt.spawn(runtime_probe());
        std::thread::Builder::new()
            .name("timeline-probe".into())
            .spawn(thread_probe)
            .expect("probe thread");
    }
    let mut header = false;
    for s in sections {
        let replicas = match s {
            "r1" => 1,
            "r3" => 3,
            "idle" => {
                rt.block_on(idle());
                continue;
            }
            other => panic!("unknown section {other}"),
        };
        if !header {
            header = true;
            println!(
                "| scenario | posts/s (median) | min–max | p50 ms | p99 ms | half-load posts/s | half-load p50 ms | half-load p99 ms |"
            );
            println!("|---|---|---|---|---|---|---|---|");
        }
        if generator_on_worker() {
            let name = s.to_string();
            rt.block_on(async move {
                tokio::spawn(async move { scenario(&name, replicas).await })
                    .await
                    .expect("scenario task")
            });
        } else {
            rt.block_on(scenario(s, replicas));
        }
    }
}

/// `CHATLOG_RAFT_TIMELINE`: where to write the half-load run's timeline (without the
/// `-<scenario>.csv` suffix); `None`: no timeline is recorded.
fn timeline_path() -> Option<String> {
    std::env::var("CHATLOG_RAFT_TIMELINE")
        .ok()
        .filter(|p| !p.is_empty())
}

/// Period of the runtime and thread probes: the timeline's resolution for "who was not
/// scheduled".
const PROBE_PERIOD: Duration = Duration::from_millis(1);

/// A tokio task asking to wake every [`PROBE_PERIOD`]; records how late it woke. Late
/// together with the posts: the runtime's workers were busy or not scheduled.
async fn runtime_probe() {
    use chatlog_storage::timeline::{Event, record};
    let mut next = tokio::time::Instant::now() + PROBE_PERIOD;
    loop {
        tokio::time::sleep_until(next).await;
        let now = tokio::time::Instant::now();
        record(
            Event::RuntimeProbe,
            0,
            now.saturating_duration_since(next).as_micros() as u64,
        );
        next = now + PROBE_PERIOD;
    }
}

/// An OS thread sleeping [`PROBE_PERIOD`] at a time; records how late it woke. Late too:
/// the host's CPUs were taken (other processes, or all of this one's threads). Every
/// [`SCHEDSTAT_EVERY`] wakes it also records, per thread of this process, the time it
/// ran and the time it waited on a run queue while runnable since the previous sample
/// (the kernel's schedstat): which thread waited for a CPU, and when.
fn thread_probe() {
    use chatlog_storage::timeline::{Event, record};
    let mut last: std::collections::HashMap<u64, (u64, u64)> = Default::default();
    let mut k = 0u64;
    loop {
        let asked = Instant::now() + PROBE_PERIOD;
        std::thread::sleep(PROBE_PERIOD);
        record(
            Event::ThreadProbe,
            0,
            Instant::now().saturating_duration_since(asked).as_micros() as u64,
        );
        k += 1;
        if k % SCHEDSTAT_EVERY != 0 {
            continue;
        }
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            continue;
        };
        for t in dir.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
            let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
            if let Some((r0, w0)) = last.insert(tid, (run, wait)) {
                record(Event::OnCpu, tid, run.saturating_sub(r0) / 1000);
                record(Event::RunQueueWait, tid, wait.saturating_sub(w0) / 1000);
            }
        }
    }
}

/// Thread probe wakes between two schedstat samples (10 ms: ~10 threads × 100 reads/s).
const SCHEDSTAT_EVERY: u64 = 10;

/// `tid,name` of every thread of this process, next to the timeline (its schedstat
/// events name threads by id).
fn thread_names() -> String {
    let mut out = String::from("tid,name\n");
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            out.push_str(&format!(
                "{},{}\n",
                t.file_name().to_string_lossy(),
                name.trim()
            ));
        }
    }
    out
}

/// `CHATLOG_RAFT_GENERATOR`: where the open loop's load generator (one task) runs.
/// `main` (the default, as in every earlier session): on the bench's main thread, in
/// `block_on`, an OS thread of its own next to the runtime's two workers, the engine's
/// I/O thread and io_uring's worker; every completion it waits for is a cross-thread
/// wake-up. `worker`: the scenario is spawned onto the runtime, so the generator is a
/// task on the same two workers as the core (one OS thread fewer competing for the two
/// vCPUs; a completion wakes it on the worker that answered). The closed loop's workers
/// are tasks either way.
fn generator_on_worker() -> bool {
    std::env::var("CHATLOG_RAFT_GENERATOR").is_ok_and(|v| v == "worker")
}

/// `CHATLOG_RAFT_SEGMENT_MB`: the engine's segment size (default: the engine's).
fn segment_bytes() -> Option<u64> {
    std::env::var("CHATLOG_RAFT_SEGMENT_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|mb| mb << 20)
}

/// `CHATLOG_RAFT_IO`: the engines' I/O backend (`syscall`, `uring`; default auto).
fn io_mode() -> chatlog_storage::IoMode {
    match std::env::var("CHATLOG_RAFT_IO").as_deref() {
        Ok("syscall") => chatlog_storage::IoMode::Syscall,
        Ok("uring") => chatlog_storage::IoMode::Uring,
        _ => chatlog_storage::IoMode::Auto,
    }
}

/// CPU seconds this process used so far (user + system).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Resident memory of this process in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Idle cost per group replica: three nodes in this process with `CHATLOG_RAFT_IDLE_GROUPS`
/// groups (default 1,000) × 3 replicas, heartbeats as `node::timing` derives them, CPU and
/// resident memory measured over `CHATLOG_RAFT_SECS` × 2 of idling.
async fn idle() {
    let groups = env_u64("CHATLOG_RAFT_IDLE_GROUPS", 1_000);
    let secs = env_u64("CHATLOG_RAFT_SECS", 5) * 2;
    let rss0 = rss_bytes();
    let t = Instant::now();
    let cluster = start_with(3, groups).await;
    let started = t.elapsed();
    let mut leaders = std::collections::BTreeMap::new();
    for g in 0..=groups {
        *leaders
            .entry(
                cluster.nodes[0]
                    .group(g)
                    .and_then(|x| x.leader())
                    .unwrap_or(0),
            )
            .or_insert(0) += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_bytes();
    let (c0, t0) = (cpu_secs(), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu = (cpu_secs() - c0) / t0.elapsed().as_secs_f64();
    let replicas = 3 * (groups + 1);
    let hb = chatlog_raft::node::timing((groups + 1) as usize, None)
        .expect("timing")
        .heartbeat_interval;
    println!(
        "| groups × replicas | heartbeat ms | start s | leaders per node | idle CPU (cores) | CPU per 1,000 replicas | RSS growth | RSS per replica |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} × 3 | {hb} | {:.1} | {:?} | {:.3} | {:.3} | {:.0} MiB | {:.0} KiB |",
        groups + 1,
        started.as_secs_f64(),
        leaders,
        cpu,
        cpu * 1000.0 / replicas as f64,
        (rss1.saturating_sub(rss0)) as f64 / (1 << 20) as f64,
        (rss1.saturating_sub(rss0)) as f64 / 1024.0 / replicas as f64,
    );
    cluster.stop().await;
}

struct Cluster {
    nodes: Vec<Arc<Node>>,
    _dirs: Vec<tempfile::TempDir>,
    stops: Vec<tokio::sync::watch::Sender<bool>>,
}

async fn start(replicas: usize) -> Cluster {
    start_with(replicas, GROUPS).await
}

/// `CHATLOG_RAFT_CHECKPOINT_EVERY`: applied entries between two state checkpoints per
/// group (default: the state machine's, `SmConfig::checkpoint_every_entries`). The
/// checkpoint's encode runs on the apply path and grows with the state, so this shows
/// how much of the half-load tail it makes.
fn checkpoint_every(config: &mut NodeConfig) {
    if let Some(n) = std::env::var("CHATLOG_RAFT_CHECKPOINT_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.sm.checkpoint_every_entries = n;
    }
}

async fn start_with(replicas: usize, groups: u64) -> Cluster {
    let mut dirs = Vec::new();
    let mut nodes = Vec::new();
    let mut stops = Vec::new();
    if replicas == 1 {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
        let mut config = NodeConfig::single(dir.path(), groups);
        config.segment_bytes = segment_bytes();
        config.io_mode = io_mode();
        checkpoint_every(&mut config);
        let node = Node::start(config, |_| NoPeers, Default::default())
            .await
            .expect("node starts");
        nodes.push(Arc::new(node));
        dirs.push(dir);
    } else {
        let ids: Vec<u64> = (1..=replicas as u64).collect();
        let listeners: Vec<tokio::net::TcpListener> = futures_util::future::join_all(
            ids.iter()
                .map(|_| tokio::net::TcpListener::bind("127.0.0.1:0")),
        )
        .await
        .into_iter()
        .map(|l| l.expect("bind"))
        .collect();
        let addrs: Vec<_> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        let mut starts = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = ids[i];
            let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
            let mut config = NodeConfig::single(dir.path(), groups);
            config.node_id = id;
            config.segment_bytes = segment_bytes();
            config.io_mode = io_mode();
            checkpoint_every(&mut config);
            config.members = ids.iter().copied().collect();
            config.replicas = replicas;
            let identity = NodeIdentity::new(42, id);
            let router = Router::new(identity);
            for (j, other) in ids.iter().enumerate() {
                if *other != id {
                    router.set_peer_addr(*other, addrs[j]);
                }
            }
            let registry = Arc::new(GroupRegistry::default());
            let (stop, mut stopped) = tokio::sync::watch::channel(false);
            let directory: Arc<dyn GroupDirectory> = registry.clone();
            tokio::spawn(chatlog_raft::network::serve(
                listener,
                identity,
                directory,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            ));
            stops.push(stop);
            dirs.push(dir);
            starts.push(tokio::spawn(async move {
                let r = router.clone();
                Node::start(config, move |g| r.network_factory(g), registry)
                    .await
                    .expect("node starts")
            }));
        }
        for s in starts {
            nodes.push(Arc::new(s.await.expect("start task")));
        }
    }
    for n in &nodes {
        n.wait_for_leaders(Duration::from_secs(60))
            .await
            .expect("leaders");
    }
    Cluster {
        nodes,
        _dirs: dirs,
        stops,
    }
}

impl Cluster {
    /// The node leading group `g`.
    fn leader_of(&self, g: u64) -> Arc<Node> {
        let id = self.nodes[0]
            .group(g)
            .expect("group")
            .leader()
            .expect("leader");
        Arc::clone(
            self.nodes
                .iter()
                .find(|n| n.node_id() == id)
                .expect("leader node"),
        )
    }

    async fn stop(self) {
        for s in &self.stops {
            let _ = s.send(true);
        }
        for n in self.nodes {
            if let Ok(n) = Arc::try_unwrap(n) {
                let _ = n.shutdown().await;
            }
        }
    }
}

/// Creates one user per group and 1,000 group chats; returns (chat, group, sender). A
/// command asked again after a leader change may leave an unused user or chat behind.
async fn setup(cluster: &Cluster) -> Vec<(u64, u64, u64)> {
    let groups: Vec<Group> = (1..=GROUPS)
        .map(|g| cluster.leader_of(g).group(g).expect("group"))
        .collect();
    let retries = AtomicU64::new(0);
    let mut users = Vec::new();
    for g in 1..=GROUPS {
        let make = || Command::CreateUser {
            name: format!("bench{g}"),
            login_token_hash: [0; 32],
        };
        match propose_retrying(&groups, &cluster.nodes, g, &retries, &make()).await {
            Outcome::UserCreated { user } => users.push(user),
            o => panic!("{o:?}"),
        }
    }
    let mut chats = Vec::new();
    for i in 0..CHATS {
        let g = 1 + (i as u64 % GROUPS);
        let user = users[(g - 1) as usize];
        let make = || Command::CreateChat {
            creator: user,
            kind: ChatKind::Group,
            title: format!("chat {i}"),
            members: vec![],
        };
        match propose_retrying(&groups, &cluster.nodes, g, &retries, &make()).await {
            Outcome::Event { chat, .. } => chats.push((chat, g, user)),
            o => panic!("{o:?}"),
        }
    }
    chats
}

/// A 256-byte text whose first digits are `i`.
fn text(i: u64) -> String {
    let mut s = String::with_capacity(TEXT_BYTES);
    set_text(&mut s, i);
    s
}

/// Rewrites `s` as [`text`]`(i)` in place: a worker reuses one post (the client's cost
/// is not the server's; the server encodes the post into its entry from a reference).
fn set_text(s: &mut String, i: u64) {
    use std::fmt::Write;
    const FILL: &str = "abcdefghijklmnopqrstuvwxyz";
    s.clear();
    let _ = write!(s, "{i}");
    while s.len() < TEXT_BYTES {
        let n = (TEXT_BYTES - s.len()).min(FILL.len());
        s.push_str(&FILL[..n]);
    }
}

/// A post of `sender` to `chat` with client message id `id` and [`text`]`(id)`.
fn post(chat: u64, sender: u64, id: u64) -> Command {
    Command::Post {
        chat,
        sender,
        client_message_id: id,
        text: text(id),
        media: None,
        reply_to: 0,
    }
}

/// Tries a bench post may make after a leader change (20 ms apart) before the run fails.
const POST_TRIES_MAX: usize = 500;

/// Proposes `command` to group `g` through `groups` (each group's
/// replica on its leader at the start); after a failure (a leader change on a loaded
/// host) asks the group's current leader again with the same command, so the same
/// client message id: the post is applied at most once (a repeat answers the original
/// seq). Counts the repeats in `retries`.
async fn propose_retrying(
    groups: &[Group],
    nodes: &[Arc<Node>],
    g: u64,
    retries: &AtomicU64,
    command: &Command,
) -> Outcome {
    if let Ok((o, _)) = groups[(g - 1) as usize].propose_command(command).await {
        return o;
    }
    for _ in 0..POST_TRIES_MAX {
        retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let leader = nodes
            .iter()
            .find_map(|n| n.group(g).and_then(|x| x.leader()));
        let group = leader
            .and_then(|id| nodes.iter().find(|n| n.node_id() == id))
            .and_then(|n| n.group(g));
        if let Some(group) = group
            && let Ok((o, _)) = group.propose_command(command).await
        {
            return o;
        }
    }
    panic!("group {g}: no leader took a post in {POST_TRIES_MAX} tries");
}

/// Window of the open loop's lateness timeline (ms of intended send time).
const LATE_WINDOW_MS: usize = 100;
/// A post later than this (µs) counts as late in the timeline: the p99 target.
const LATE_US: u64 = 5_000;

struct Run {
    posts_per_sec: f64,
    hist: Histogram<u64>,
}

/// Closed loop: `inflight` workers post back to back for `secs`.
async fn closed_loop(
    cluster: &Cluster,
    chats: &[(u64, u64, u64)],
    secs: u64,
    inflight: u64,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1));
    let leaders: Vec<_> = (1..=GROUPS).map(|g| cluster.leader_of(g)).collect();
    // Each group's replica on its leader, looked up once (the client's cost is not the
    // server's).
    let groups: Arc<Vec<Group>> = Arc::new(
        (1..=GROUPS)
            .map(|g| leaders[(g - 1) as usize].group(g).expect("group"))
            .collect(),
    );
    let chats: Arc<Vec<(u64, u64, u64)>> = Arc::new(chats.to_vec());
    let nodes = Arc::new(cluster.nodes.clone());
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let stop = Arc::clone(&stop);
        let measuring = Arc::clone(&measuring);
        let next_id = Arc::clone(&next_id);
        let chats = Arc::clone(&chats);
        let groups = Arc::clone(&groups);
        let nodes = Arc::clone(&nodes);
        let retries = Arc::clone(&retries);
        tasks.push(tokio::spawn(async move {
            // Latencies (µs) as plain values, merged into one histogram at the end: 2,048
            // histograms of ~0.25 MB each cost the client cache misses and page faults
            // (3.5% of a run's samples in the session-6 profile).
            let mut latencies_us: Vec<u32> = Vec::with_capacity(1 << 12);
            let mut k = w as usize * 7919;
            let mut command = post(0, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                k = (k + 104_729) % chats.len();
                let (to, g, from) = chats[k];
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                if let Command::Post {
                    chat,
                    sender,
                    client_message_id,
                    text,
                    ..
                } = &mut command
                {
                    (*chat, *sender, *client_message_id) = (to, from, id);
                    set_text(text, id);
                }
                let t = Instant::now();
                let out = propose_retrying(&groups, &nodes, g, &retries, &command).await;
                assert!(matches!(out, Outcome::Event { .. }), "{out:?}");
                if measuring.load(Ordering::Relaxed) {
                    latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            latencies_us
        }));
    }
    let applied = |leaders: &[Arc<Node>]| -> u64 {
        (1..=GROUPS)
            .map(|g| {
                *leaders[(g - 1) as usize]
                    .group(g)
                    .expect("group")
                    .shared()
                    .applied()
                    .borrow()
            })
            .sum()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let entries0 = applied(&leaders);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let entries = applied(&leaders) - entries0;
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3).expect("hist");
    for t in tasks {
        for us in t.await.expect("worker") {
            hist.record(u64::from(us)).expect("record");
        }
    }
    let posts = hist.len();
    eprintln!(
        "  {entries} entries applied: {:.0} entries/s, {:.1} posts per entry, {} posts asked again after a leader change",
        entries as f64 / elapsed,
        posts as f64 / entries.max(1) as f64,
        retries.load(Ordering::Relaxed),
    );
    Run {
        posts_per_sec: posts as f64 / elapsed,
        hist,
    }
}

/// Open loop: posts issued at `rate`/s regardless of completions; latency counted from
/// the intended start. One task issues the posts and collects their completions (no task
/// per post, so the load generator's own scheduling adds as little as it can to the
/// figure); posts due at the same timer tick (1 ms) are issued together.
async fn open_loop(cluster: &Cluster, chats: &[(u64, u64, u64)], secs: u64, rate: f64) -> Run {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;
    let groups: Vec<Group> = (1..=GROUPS)
        .map(|g| cluster.leader_of(g).group(g).expect("group"))
        .collect();
    let nodes = cluster.nodes.clone();
    let retries = AtomicU64::new(0);
    let total = (rate * secs as f64) as u64;
    let t0 = Instant::now();
    let base_id = 1u64 << 40;
    let due = |i: u64| t0 + Duration::from_secs_f64(i as f64 / rate);
    let mut k = 0usize;
    let mut next = 0u64;
    let mut in_flight = FuturesUnordered::new();
    let mut hist = Histogram::<u64>::new(3).expect("hist");
    // How late each post was asked of the server against its intended time: the load
    // generator's own share of the latency (it runs on the same cores).
    let mut issued_late = Histogram::<u64>::new(3).expect("hist");
    // Per LATE_WINDOW_MS of intended send time: posts, posts later than LATE_US, the
    // latest (µs). Tells a stall (a few windows) from a spread (all of them).
    let mut windows = vec![(0u64, 0u64, 0u64); (secs as usize * 1000) / LATE_WINDOW_MS + 2];
    let far = t0 + Duration::from_secs(secs + 3600);
    let sleep = tokio::time::sleep_until(t0.into());
    tokio::pin!(sleep);
    use chatlog_storage::timeline::{Event, record};
    record(Event::Mark, 0, 1);
    let mut ran = Instant::now();
    while next < total || !in_flight.is_empty() {
        if chatlog_storage::timeline::enabled() {
            let gap = ran.elapsed();
            ran = Instant::now();
            if gap > Duration::from_micros(500) {
                record(Event::GeneratorGap, 0, gap.as_micros() as u64);
            }
        }
        if next < total && due(next) <= Instant::now() {
            let now = Instant::now();
            while next < total && due(next) <= now {
                k = (k + 104_729) % chats.len();
                let (chat, g, sender) = chats[k];
                let i = next;
                let (groups, nodes, retries) = (&groups, &nodes, &retries);
                let command = post(chat, sender, base_id + i);
                in_flight.push(async move {
                    // First polled: when the post reaches the server's queue.
                    let asked = Instant::now();
                    let late = asked.saturating_duration_since(due(i)).as_micros() as u64;
                    if late > 1_000 {
                        record(Event::AskedLate, g, late);
                    }
                    propose_retrying(groups, nodes, g, retries, &command).await;
                    let us = due(i).elapsed().as_micros() as u64;
                    if us > LATE_US {
                        record(Event::LatePost, g, us);
                    }
                    (i, us, late)
                });
                next += 1;
            }
            continue;
        }
        let wake = tokio::time::Instant::from_std(if next < total { due(next) } else { far });
        // One timer, moved only when the next send time changes: a completion (one per
        // post) does not register a new one.
        if sleep.deadline() != wake {
            sleep.as_mut().reset(wake);
        }
        tokio::select! {
            Some((i, us, late)) = in_flight.next(), if !in_flight.is_empty() => {
                hist.record(us).expect("record");
                issued_late.record(late).expect("record");
                let w = &mut windows[(i as f64 / rate * 1000.0) as usize / LATE_WINDOW_MS];
                w.0 += 1;
                if us > LATE_US {
                    w.1 += 1;
                    w.2 = w.2.max(us);
                }
            }
            _ = &mut sleep => {}
        }
    }
    record(Event::Mark, 0, 2);
    for (k, w) in windows.iter().enumerate() {
        if w.0 > 0 {
            // The window's start on the timeline's clock, then its late posts.
            let start = t0 + Duration::from_millis((k * LATE_WINDOW_MS) as u64);
            record(
                Event::Window,
                chatlog_storage::timeline::ns_of(start) / 1000,
                w.1,
            );
        }
    }
    let retries = retries.load(Ordering::Relaxed);
    if retries > 0 {
        eprintln!("  open loop: {retries} posts asked again after a leader change");
    }
    let late: Vec<String> = windows
        .iter()
        .enumerate()
        .filter(|(_, w)| w.1 > 0)
        .map(|(k, w)| {
            format!(
                "{:.1}s:{}/{}<={:.0}ms",
                (k * LATE_WINDOW_MS) as f64 / 1000.0,
                w.1,
                w.0,
                ms(w.2)
            )
        })
        .collect();
    eprintln!(
        "  open loop: posts asked of the server late by p50 {:.2} ms, p99 {:.2} ms (the load generator's share)",
        ms(issued_late.value_at_quantile(0.5)),
        ms(issued_late.value_at_quantile(0.99)),
    );
    eprintln!(
        "  open loop: {} of {} windows of {LATE_WINDOW_MS} ms had posts later than {} ms (start: late/posts<=worst): {}",
        late.len(),
        windows.iter().filter(|w| w.0 > 0).count(),
        LATE_US / 1000,
        late.iter().take(24).cloned().collect::<Vec<_>>().join(" ")
    );
    Run {
        posts_per_sec: total as f64 / t0.elapsed().as_secs_f64(),
        hist,
    }
}

/// The p50 and p99 bucket bounds (ms) of what `after` recorded beyond `before` (the
/// engine's and the groups' fixed-bucket histograms are cumulative since open).
fn window_quantiles(
    before: &chatlog_storage::HistogramSnapshot,
    after: &chatlog_storage::HistogramSnapshot,
) -> (f64, f64) {
    let buckets: Vec<(f64, u64)> = after
        .buckets
        .iter()
        .zip(&before.buckets)
        .map(|(a, b)| (a.0, a.1.saturating_sub(b.1)))
        .collect();
    let window = chatlog_storage::HistogramSnapshot {
        count: buckets.last().map_or(0, |b| b.1),
        buckets,
        sum_seconds: after.sum_seconds - before.sum_seconds,
    };
    let q = |q| window.quantile_bound(q).map_or(f64::NAN, |s| s * 1000.0);
    (q(0.5), q(0.99))
}

/// Fixed-bucket histograms that explain a run's latency: each engine's write +
/// fdatasync, each entry's propose-to-applied time on its leader, and how long each
/// entry's first post queued before the batcher took it (merged).
fn latency_parts(
    cluster: &Cluster,
) -> (
    chatlog_storage::HistogramSnapshot,
    chatlog_storage::HistogramSnapshot,
    chatlog_storage::HistogramSnapshot,
) {
    let merge = |snaps: Vec<chatlog_storage::HistogramSnapshot>| {
        let mut out = snaps[0].clone();
        for s in &snaps[1..] {
            for (o, b) in out.buckets.iter_mut().zip(&s.buckets) {
                o.1 += b.1;
            }
            out.count += s.count;
            out.sum_seconds += s.sum_seconds;
        }
        out
    };
    let sync = merge(
        cluster
            .nodes
            .iter()
            .map(|n| n.engine().stats().sync_latency)
            .collect(),
    );
    let commit = merge(
        (1..=GROUPS)
            .map(|g| {
                cluster
                    .leader_of(g)
                    .group(g)
                    .expect("group")
                    .commit_latency()
                    .snapshot()
            })
            .collect(),
    );
    let queue = merge(
        (1..=GROUPS)
            .map(|g| {
                cluster
                    .leader_of(g)
                    .group(g)
                    .expect("group")
                    .queue_latency()
                    .snapshot()
            })
            .collect(),
    );
    (sync, commit, queue)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn scenario(name: &str, replicas: usize) {
    let secs = env_u64("CHATLOG_RAFT_SECS", 5);
    let repeats = env_u64("CHATLOG_RAFT_REPEATS", 3).max(1);
    let inflight = env_u64("CHATLOG_RAFT_INFLIGHT", 2048);
    let mut runs = Vec::new();
    let mut half = None;
    for r in 0..repeats {
        let cluster = start(replicas).await;
        let chats = setup(&cluster).await;
        let run = closed_loop(&cluster, &chats, secs, inflight).await;
        eprintln!(
            "{name} run {r}: {:.0} posts/s, p50 {:.2} ms, p99 {:.2} ms",
            run.posts_per_sec,
            ms(run.hist.value_at_quantile(0.5)),
            ms(run.hist.value_at_quantile(0.99))
        );
        if r == repeats - 1 {
            let mut rates: Vec<f64> = runs
                .iter()
                .map(|r: &Run| r.posts_per_sec)
                .chain([run.posts_per_sec])
                .collect();
            rates.sort_by(f64::total_cmp);
            let median = rates[rates.len() / 2];
            // `CHATLOG_RAFT_OPEN_RATE` replaces half the median by a fixed rate.
            let rate = std::env::var("CHATLOG_RAFT_OPEN_RATE")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(median / 2.0);
            let (sync0, commit0, queue0) = latency_parts(&cluster);
            let run = open_loop(&cluster, &chats, secs, rate).await;
            let (sync1, commit1, queue1) = latency_parts(&cluster);
            let (s50, s99) = window_quantiles(&sync0, &sync1);
            let (c50, c99) = window_quantiles(&commit0, &commit1);
            let (q50, q99) = window_quantiles(&queue0, &queue1);
            eprintln!(
                "{name} half load {rate:.0}/s: posts p50 {:.2} ms, p99 {:.2} ms; entry's first post queued p50 <= {q50} ms, p99 <= {q99} ms; entry propose-to-applied p50 <= {c50} ms, p99 <= {c99} ms; write + fdatasync p50 <= {s50} ms, p99 <= {s99} ms ({} syncs)",
                ms(run.hist.value_at_quantile(0.5)),
                ms(run.hist.value_at_quantile(0.99)),
                sync1.count - sync0.count,
            );
            half = Some(run);
            if let Some(path) = timeline_path() {
                let path = format!("{path}-{name}.csv");
                match chatlog_storage::timeline::dump(std::path::Path::new(&path)) {
                    Ok(n) => eprintln!("  timeline: {n} events in {path}"),
                    Err(e) => eprintln!("  timeline: writing {path} failed: {e}"),
                }
                let threads = format!("{path}.threads");
                if let Err(e) = std::fs::write(&threads, thread_names()) {
                    eprintln!("  timeline: writing {threads} failed: {e}");
                }
            }
        }
        runs.push(run);
        cluster.stop().await;
    }
    runs.sort_by(|a, b| a.posts_per_sec.total_cmp(&b.posts_per_sec));
    let median = &runs[runs.len() / 2];
    let half = half.expect("half-load run");
    println!(
        "| {name} ({replicas} replica{}, {GROUPS} groups, {CHATS} chats, {TEXT_BYTES} B, {inflight} in flight) | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
        if replicas == 1 { "" } else { "s" },
        median.posts_per_sec,
        runs[0].posts_per_sec,
        runs[runs.len() - 1].posts_per_sec,
        ms(median.hist.value_at_quantile(0.5)),
        ms(median.hist.value_at_quantile(0.99)),
        half.posts_per_sec,
        ms(half.hist.value_at_quantile(0.5)),
        ms(half.hist.value_at_quantile(0.99)),
    );
}
