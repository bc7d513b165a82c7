//! `chatlog bench <scenario>`: the load generator. It drives a real server over the real
//! protocol (`chatlog_wire::Client`), either one given by `--server` or one it starts in
//! this process in a temporary directory (`--embedded`), and reports throughput, latency
//! percentiles (HdrHistogram), errors by kind and, when embedded, the server's CPU and
//! memory.
//!
//! What it owns: the flags, setting up users and chats, the scenarios' request loops
//! (`scenarios.rs`), the choice of chats and operations (`dist.rs`) and the report
//! (`report.rs`). What it must not do: reach any address but the one given (or its own
//! loopback server), run unbounded (every loop stops at `--count`, `--duration` or a
//! fixed cap), or panic on a server's error (errors are counted by kind).

mod catchup;
mod dist;
mod fanout;
mod media;
mod report;
mod scenarios;

use std::sync::Arc;
use std::time::Duration;

use chatlog_raft::chat::GROUPS_MAX;
use chatlog_raft::node::{NoPeers, Node, NodeConfig};
use chatlog_wire::client::{Client, ClientError, ClientOptions, ReconnectPolicy};
use chatlog_wire::limits::{PAGE_ITEMS_MAX, TEXT_BYTES_MAX};
use chatlog_wire::proto::v1;
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::cli::CliError;
use crate::gateway::{self, GatewayLimits};
use crate::service::ChatService;
pub use dist::{Distribution, Mix, OpKind};
use report::Report;

/// The client name sent in every handshake.
const CLIENT_NAME: &str = concat!("chatlog-bench/", env!("CARGO_PKG_VERSION"));

/// Thread-name prefix of the load generator's runtime; the embedded server's CPU time is
/// the process's less these threads'.
const CLIENT_THREADS: &str = "bench-client";

/// Exit status of a scenario that cannot run yet.
pub const EXIT_NOT_AVAILABLE: i32 = 2;

/// How long the embedded server may take to elect a leader in every group.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Most chats created at once during setup.
const SETUP_CONCURRENCY: usize = 32;

/// The end of `chatlog bench --help`.
const AFTER_HELP: &str = "\
Scenarios:
  send    C connections x W callers each post --size byte messages to --chats chats
          chosen by --distribution; closed loop, or open loop with --rate (latency is
          then measured from each operation's intended start, so a slow server shows
          as latency, not as fewer requests: no coordinated omission).
  sync    --devices devices each hold a position in a chat, go offline while the
          connections post --backlog messages, then catch up with history pages of
          --page events from their last seq; repeated --rounds times. Reports catch-up
          time and events/s; any gap or duplicate in what a device reads is an error.
  mixed   send, history (newest page of a chat) and sync (catch a chat up from the
          last seq this caller saw) in the proportions of --mix.
  subscribe
          --subscribers connections subscribe to every one of --chats chats; the
          connections post (best with --rate) and every push is timed from its
          post's start to its arrival (post-to-push delivery latency).
  fanout  one channel of --members members (default: --online), of whom --online
          (default 15000) are online, each on its own connection, spread over --workers
          child processes (at most 5000 connections each: a process may hold 20,000
          files); the owner posts every --post-interval-ms (open loop, each text
          stamped with its send time, CLOCK_MONOTONIC, shared by the processes). Live
          pushes (the hub's, unasked) are timed at every subscriber: \"latency_us\" is
          send stamp to arrival of every delivery; \"fanout\" adds per post the last
          subscriber's arrival (last_delivery_us from the send, last_after_ack_us from
          the post's acknowledgement, i.e. its commit), post_ack_us, deliveries/s over
          the measured posts, the embedded server's CPU per post, and checks that every
          subscriber got every post exactly once in order (subscribers_complete). Does
          not use --connections' users or --chats. Needs a server without rate limits.
  catchup a device --backlog events (default 10000) behind across --chats chats
          (default 100), posted evenly while it is offline, reconnects: one round is
          timed from connect to fully synced (one sync request with every chat's
          position, then forward history pages for chats still behind, in parallel;
          pages of 100 events, the protocol's largest), --rounds times; every chat must
          hold exactly its posted events.
  media   --count files (default: one per connection) of --file-size random bytes are
          written to a temporary directory and hashed before any timing (so an upload
          reads its file from page cache and sends the SHA-256 it knows instead of
          hashing again; the server hashes and checks every byte), uploaded at once, file i through connection i mod
          --connections with --in-flight parts in flight (at most 64), then downloaded
          again the same way (every chunk checked against the CRC-32 stored with its
          part; with --verify-sha256 every file also against its SHA-256 on a separate
          thread). The download is written to a file, or with
          --sink to nowhere (checked all the same), so the figure is the server's and
          the network's, not the client's disk. Reports MB/s and per-file latency of
          each phase and the peak resident memory (anonymous and file-backed: mapped
          media is page cache) under \"media\"; embedded, the memory is the
          process's, load generator included. To keep the load generator's CPU (its
          SHA-256 and CRC-32 of every byte) out of the server's process, run the server
          apart (chatlog serve) and point --server at it; benches/README.md shows how.

Setup creates --connections users (dev mode: the server must run with its default
--dev-mode true), logs each in, and creates --chats groups whose members are all of
them. Warm-up operations (--warmup) are run but excluded from every figure; errors
are counted over the whole run. The run stops at --count measured operations or
after --warmup + --duration seconds, whichever comes first; operations in flight then
complete. Every run prints its full configuration and a command line that repeats it.

--json prints one object: {\"scenario\", \"throughput_ops\", \"throughput_mb\", \"ops\",
\"ops_are\", \"bytes\", \"measured_secs\", \"warmup\", \"latency_us\": {\"p50\", \"p90\",
\"p99\", \"p999\", \"max\", \"mean\", \"count\"}, \"latency_of\", \"errors\",
\"errors_by_kind\": {KIND: N}, \"by_kind\": {OP: {\"ops\", \"latency_us\"}} (mixed,
fanout), scenario figures (\"sync\", \"fanout\"), \"server\": {\"cpu_secs\",
\"cpu_cores\", \"rss_bytes\"} (embedded only), \"config\": {FLAG: VALUE}, \"command\"}.
Exit status: 0 after a run (even one with errors: read \"errors\"), 1 when setup
fails, 2 for a usage error or a scenario that is not available yet.";

/// What `chatlog bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Post messages as fast as the server takes them (or at --rate).
    Send,
    /// Devices that go offline and catch up by history pages.
    Sync,
    /// Sends, history reads and syncs in the proportions of --mix.
    Mixed,
    /// Post-to-push latency of subscriptions: --subscribers subscribers per chat.
    Subscribe,
    /// Live fan-out of one channel to --online subscriber connections.
    Fanout,
    /// Connect-to-synced time of a device --backlog events behind over --chats chats.
    Catchup,
    /// Concurrent media uploads, then downloads, of --file-size files.
    Media,
    /// Internal: a child process of `fanout` holding subscriber connections.
    #[value(hide = true)]
    FanoutWorker,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Send => "send",
            Scenario::Sync => "sync",
            Scenario::Mixed => "mixed",
            Scenario::Subscribe => "subscribe",
            Scenario::Fanout => "fanout",
            Scenario::Catchup => "catchup",
            Scenario::Media => "media",
            Scenario::FanoutWorker => "fanout-worker",
        }
    }
}

/// Flags of `chatlog bench`.
#[derive(Debug, Clone, Args)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// What to measure (see "Scenarios" below).
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Drive the server at this client address (what `chatlog serve` prints as
    /// `clients: ADDR`). Nothing else is contacted.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "embedded",
        required_unless_present = "embedded"
    )]
    pub server: Option<String>,
    /// Start a single-node server in this process, in a temporary directory removed
    /// afterwards, on 127.0.0.1; its CPU time and memory are reported.
    #[arg(long)]
    pub embedded: bool,
    /// Chat groups of the embedded server (--embedded only).
    #[arg(long, default_value_t = crate::serve::DEFAULT_GROUPS)]
    pub groups: u64,
    /// Client connections, each logged in as its own user.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Callers per connection, each with one request in flight (the server's
    /// per-connection limit, 128 by default, caps it).
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Message text size in bytes (1 to 16384; fanout needs at least 16).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Group chats created for the run; every connection's user is a member of each.
    #[arg(long, default_value_t = 100)]
    pub chats: usize,
    /// How each operation picks its chat: uniform, zipf (exponent 1) or zipf:S; with
    /// Zipf the chat created k-th is chosen with probability proportional to 1/k^S.
    #[arg(long, value_name = "uniform|zipf[:S]", default_value = "uniform", value_parser = dist::parse_distribution)]
    pub distribution: Distribution,
    /// Stop after this many measured operations (send, mixed, fanout posts).
    #[arg(long)]
    pub count: Option<u64>,
    /// Measure for this many seconds after the warm-up; with --count, the run stops at
    /// whichever comes first. For sync, the limit on the whole run.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Open loop: start operations at this total rate (per second, over all
    /// connections), each timed from its intended start. Without it, a closed loop: each
    /// caller starts its next operation when the last one is answered.
    #[arg(long, value_name = "OPS")]
    pub rate: Option<f64>,
    /// Seconds of operations run first and excluded from every figure (not used by
    /// sync, which times only its catch-up phases).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// mixed: weights of the operations, KIND=WEIGHT,... with kinds send, history, sync.
    #[arg(long, default_value = "send=80,history=15,sync=5", value_parser = dist::parse_mix)]
    pub mix: Mix,
    /// Events per history page (history, sync; 1 to 100).
    #[arg(long, default_value_t = 50)]
    pub page: u32,
    /// sync: devices that go offline and catch up (each its own login and connection).
    #[arg(long, default_value_t = 8)]
    pub devices: usize,
    /// sync: messages posted (in total, over the devices' chats) while devices are
    /// offline, per round (default 2000); catchup: events the device is behind, spread
    /// evenly over --chats (default 10000).
    #[arg(long)]
    pub backlog: Option<u64>,
    /// sync, catchup: offline/catch-up rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// subscribe: subscriber connections, each subscribed to every chat (so --chats is
    /// at most 100).
    #[arg(long, default_value_t = 4)]
    pub subscribers: usize,
    /// fanout: channel members with an online connection (one connection each).
    #[arg(long, default_value_t = 15_000)]
    pub online: usize,
    /// fanout: channel members in all (the rest are offline); default --online.
    #[arg(long)]
    pub members: Option<usize>,
    /// fanout: child processes holding the subscriber connections; default one per
    /// 5000 connections.
    #[arg(long)]
    pub workers: Option<usize>,
    /// fanout: milliseconds between two posts (open loop).
    #[arg(long, value_name = "MS", default_value_t = 10.0)]
    pub post_interval_ms: f64,
    /// media: download to nowhere instead of a file (chunks CRC-checked as always), so
    /// the client's disk is not measured.
    #[arg(long)]
    pub sink: bool,
    /// media: also check each downloaded file's SHA-256 against its media id (as
    /// `chatlog download --verify-sha256`), not only every chunk's CRC-32.
    #[arg(long)]
    pub verify_sha256: bool,
    /// media: bytes of each file (1 to 4 GiB).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    pub file_size: u64,
    /// Seed of every random choice (chats, operations, message text).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of the table (see below).
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    fn check(&self) -> Result<(), String> {
        let in_range = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(format!("--{name} must be {lo} to {hi}, not {v}"))
            } else {
                Ok(())
            }
        };
        in_range("connections", self.connections, 1, 1_000)?;
        in_range("in-flight", self.in_flight, 1, 1_024)?;
        in_range("size", self.size, 1, TEXT_BYTES_MAX as usize)?;
        in_range("chats", self.chats, 1, 100_000)?;
        in_range("page", self.page as usize, 1, PAGE_ITEMS_MAX as usize)?;
        in_range("devices", self.devices, 1, 10_000)?;
        in_range("subscribers", self.subscribers, 1, 1_000)?;
        if let Some(b) = self.backlog {
            in_range("backlog", b as usize, 1, 10_000_000)?;
        }
        if self.embedded && (self.groups == 0 || self.groups >= GROUPS_MAX) {
            return Err(format!("--groups must be 1 to {}", GROUPS_MAX - 1));
        }
        if !(self.duration > 0.0 && self.duration <= 86_400.0) {
            return Err("--duration must be more than 0 and at most 86400".into());
        }
        if !(self.warmup >= 0.0 && self.warmup <= 3_600.0) {
            return Err("--warmup must be 0 to 3600".into());
        }
        if let Some(rate) = self.rate
            && !(rate > 0.0 && rate <= 10_000_000.0)
        {
            return Err("--rate must be more than 0 and at most 10000000".into());
        }
        if self.count == Some(0) {
            return Err("--count must be at least 1".into());
        }
        if self.scenario == Scenario::Media {
            let max = chatlog_wire::limits::MEDIA_FILE_BYTES_MAX;
            if self.file_size == 0 || self.file_size > max {
                return Err(format!("--file-size must be 1 to {max}"));
            }
            if self.count.is_some_and(|c| c > 1_000) {
                return Err("media: --count must be at most 1000 files".into());
            }
        }
        if self.scenario == Scenario::Fanout {
            if self.size < scenarios::STAMP_BYTES {
                return Err(format!(
                    "fanout needs --size of at least {} (each message carries its send time)",
                    scenarios::STAMP_BYTES
                ));
            }
            in_range("online", self.online, 1, fanout::ONLINE_MAX)?;
            if let Some(m) = self.members {
                in_range("members", m, self.online, fanout::MEMBERS_MAX)?;
            }
            if let Some(w) = self.workers {
                in_range("workers", w, 1, fanout::WORKERS_MAX)?;
                if self.online.div_ceil(w) > fanout::WORKER_CONNECTIONS_MAX {
                    return Err(format!(
                        "--workers {w} would hold over {} connections each",
                        fanout::WORKER_CONNECTIONS_MAX
                    ));
                }
            }
            if !(self.post_interval_ms >= 0.1 && self.post_interval_ms <= 60_000.0) {
                return Err("--post-interval-ms must be 0.1 to 60000".into());
            }
        }
        if self.scenario == Scenario::Subscribe {
            if self.size < scenarios::STAMP_BYTES {
                return Err(format!(
                    "fanout needs --size of at least {} (each message carries its send time)",
                    scenarios::STAMP_BYTES
                ));
            }
            in_range("chats", self.chats, 1, 100)?;
        }
        Ok(())
    }

    /// The flags as JSON (every one that affects the run).
    fn config(&self) -> Map<String, Value> {
        let mut c = Map::new();
        c.insert("scenario".into(), json!(self.scenario.name()));
        match &self.server {
            Some(addr) => c.insert("server".into(), json!(addr)),
            None => c.insert("embedded".into(), json!(true)),
        };
        if self.embedded {
            c.insert("groups".into(), json!(self.groups));
        }
        c.insert("connections".into(), json!(self.connections));
        c.insert("in_flight".into(), json!(self.in_flight));
        c.insert("size".into(), json!(self.size));
        c.insert("chats".into(), json!(self.chats));
        c.insert("distribution".into(), json!(self.distribution.to_string()));
        c.insert("count".into(), json!(self.count));
        c.insert("duration".into(), json!(self.duration));
        c.insert("rate".into(), json!(self.rate));
        c.insert("warmup".into(), json!(self.warmup));
        c.insert("page".into(), json!(self.page));
        c.insert("seed".into(), json!(self.seed));
        match self.scenario {
            Scenario::Mixed => {
                c.insert("mix".into(), json!(self.mix.to_string()));
            }
            Scenario::Sync => {
                c.insert("devices".into(), json!(self.devices));
                c.insert("backlog".into(), json!(self.backlog.unwrap_or(2_000)));
                c.insert("rounds".into(), json!(self.rounds));
            }
            Scenario::Subscribe => {
                c.insert("subscribers".into(), json!(self.subscribers));
            }
            Scenario::Fanout => {
                c.insert("online".into(), json!(self.online));
                c.insert("members".into(), json!(self.members.unwrap_or(self.online)));
                c.insert(
                    "workers".into(),
                    json!(
                        self.workers.unwrap_or_else(|| self
                            .online
                            .div_ceil(fanout::WORKER_CONNECTIONS_MAX))
                    ),
                );
                c.insert("post_interval_ms".into(), json!(self.post_interval_ms));
            }
            Scenario::Catchup => {
                c.insert(
                    "backlog".into(),
                    json!(self.backlog.unwrap_or(catchup::CATCHUP_BACKLOG_DEFAULT)),
                );
                c.insert("rounds".into(), json!(self.rounds));
            }
            Scenario::Media => {
                c.insert("file_size".into(), json!(self.file_size));
                if self.sink {
                    c.insert("sink".into(), json!(true));
                }
                if self.verify_sha256 {
                    c.insert("verify_sha256".into(), json!(true));
                }
            }
            _ => {}
        }
        c
    }

    /// A command line that repeats this run.
    fn command(&self) -> String {
        let mut parts = vec![format!("chatlog bench {}", self.scenario.name())];
        for (k, v) in self.config() {
            if k == "scenario" || v.is_null() {
                continue;
            }
            let flag = k.replace('_', "-");
            match v {
                Value::Bool(true) => parts.push(format!("--{flag}")),
                Value::String(s) => parts.push(format!("--{flag} {s}")),
                other => parts.push(format!("--{flag} {other}")),
            }
        }
        parts.join(" ")
    }
}

/// Runs `chatlog bench`.
pub fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.scenario == Scenario::FanoutWorker {
        return fanout::worker_main();
    }
    if let Err(e) = args.check() {
        eprintln!("error: {e}");
        std::process::exit(EXIT_NOT_AVAILABLE);
    }
    let clients = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()?;
    let report = if args.embedded {
        let server = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("chatlog-server")
            .build()?;
        // Room for every subscriber connection of a fanout run, and the setup's.
        let connections_max = match args.scenario {
            Scenario::Fanout => gateway::CONNECTIONS_MAX.max(args.online + 256),
            _ => gateway::CONNECTIONS_MAX,
        };
        if args.scenario == Scenario::Fanout {
            crate::gateway::raise_open_files_limit();
        }
        let embedded = server.block_on(Embedded::start(args.groups, connections_max))?;
        let addr = embedded.addr.clone();
        let args2 = args.clone();
        let result = clients.block_on(async move {
            tokio::spawn(bench(args2, addr, true))
                .await
                .map_err(|e| format!("load generator failed: {e}"))?
        });
        server.block_on(embedded.stop());
        result?
    } else {
        let addr = args.server.clone().unwrap_or_default();
        let args2 = args.clone();
        clients.block_on(async move {
            tokio::spawn(bench(args2, addr, false))
                .await
                .map_err(|e| format!("load generator failed: {e}"))?
        })?
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

/// A node and gateway in this process, on 127.0.0.1, data in a temporary directory.
struct Embedded {
    node: Arc<Node>,
    addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    gateway: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Embedded {
    async fn start(groups: u64, connections_max: usize) -> Result<Embedded, CliError> {
        let dir = tempfile::Builder::new()
            .prefix("chatlog-bench-")
            .tempdir()?;
        let node = Node::start(
            NodeConfig::single(dir.path(), groups),
            |_| NoPeers,
            Default::default(),
        )
        .await?;
        node.wait_for_leaders(LEADER_WAIT).await?;
        let node = Arc::new(node);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let service = Arc::new(ChatService::with_limits(
            Arc::clone(&node),
            true,
            // A load generator measures the server, not its rate limits.
            crate::service::ratelimit::RateLimits {
                user_sends_per_sec: 0.0,
                conn_requests_per_sec: 0.0,
            },
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = tokio::spawn(gateway::serve(
            listener,
            service,
            GatewayLimits {
                connections_max,
                ..GatewayLimits::default()
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Embedded {
            node,
            addr,
            stop,
            gateway,
            dir,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.gateway.await;
        match Arc::try_unwrap(self.node) {
            Ok(node) => {
                if let Err(e) = node.shutdown().await {
                    tracing::warn!(error = %e, "embedded server did not stop cleanly");
                }
            }
            Err(node) => {
                for g in node.groups() {
                    let _ = g.raft().shutdown().await;
                }
            }
        }
        drop(self.dir);
    }
}

/// One user of the run: logged in once per connection it serves.
#[derive(Debug, Clone)]
struct BenchUser {
    user_id: u64,
    login_token: String,
}

/// Users, their connections and the chats they share.
#[derive(Debug)]
struct World {
    addr: String,
    users: Vec<BenchUser>,
    /// One per user, logged in.
    conns: Vec<Client>,
    chats: Vec<u64>,
}

fn options(token: Option<String>, in_flight: usize) -> ClientOptions {
    ClientOptions {
        client_name: CLIENT_NAME.to_owned(),
        token,
        requests_in_flight_max: in_flight.max(1),
        // A benchmark reports failures; it does not hide them behind repeats.
        retries_max: 0,
        reconnect: ReconnectPolicy::default(),
        ..ClientOptions::default()
    }
}

/// Logs `user` in from a new device and returns a connection authenticated as it.
async fn login(
    addr: &str,
    user: &BenchUser,
    device: &str,
    in_flight: usize,
) -> Result<Client, ClientError> {
    let client = Client::connect(addr, options(None, in_flight)).await?;
    client
        .login(v1::LoginRequest {
            user_id: user.user_id,
            login_token: user.login_token.clone(),
            device_id: device.to_owned(),
            device_name: "chatlog bench".to_owned(),
        })
        .await?;
    Ok(client)
}

fn setup_error(what: &str, e: ClientError) -> CliError {
    format!("setup: {what}: {}", crate::client_cmd::CmdError::from(e)).into()
}

/// Creates the users (names unique to this run), their connections and the chats.
async fn setup(args: &BenchArgs, addr: String) -> Result<World, CliError> {
    let run_id: u32 = rand::random();
    let anon = Client::connect(&addr, options(None, 8))
        .await
        .map_err(|e| setup_error(&format!("connecting to {addr}"), e))?;
    let mut users = Vec::with_capacity(args.connections);
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let created = anon
            .create_user(v1::CreateUserRequest {
                name: format!("b{run_id:08x}_{i}"),
            })
            .await
            .map_err(|e| setup_error("creating a user (is the server in dev mode?)", e))?;
        if created.login_token.is_empty() {
            return Err("setup: the server gave no login token: run it in dev mode".into());
        }
        let user = BenchUser {
            user_id: created.user_id,
            login_token: created.login_token,
        };
        let conn = login(&addr, &user, &format!("bench-conn-{i}"), args.in_flight)
            .await
            .map_err(|e| setup_error("logging in", e))?;
        users.push(user);
        conns.push(conn);
    }
    // Every user is a member of every chat: the first creates it with up to a page of
    // members and invites the rest.
    let members: Vec<u64> = users[1..].iter().map(|u| u.user_id).collect();
    let owner = conns[0].clone();
    let mut chats = Vec::with_capacity(args.chats);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    while chats.len() < args.chats {
        while next < args.chats && pending.len() < SETUP_CONCURRENCY {
            let owner = owner.clone();
            let members = members.clone();
            let title = format!("bench {run_id:08x} {next}");
            pending.spawn(async move {
                let (first, rest) = members.split_at(members.len().min(PAGE_ITEMS_MAX as usize));
                let created = owner
                    .create_chat(v1::CreateChatRequest {
                        kind: v1::ChatKind::Group.into(),
                        title,
                        member_ids: first.to_vec(),
                    })
                    .await?;
                for user_id in rest {
                    owner
                        .invite(v1::InviteRequest {
                            chat_id: created.chat_id,
                            user_id: *user_id,
                        })
                        .await?;
                }
                Ok::<_, ClientError>((next, created.chat_id))
            });
            next += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(created))) => chats.push(created),
            Some(Ok(Err(e))) => return Err(setup_error("creating a chat", e)),
            Some(Err(e)) => return Err(format!("setup: {e}").into()),
            None => break,
        }
    }
    // Creation order is the Zipf rank order.
    chats.sort_unstable();
    let chats = chats.into_iter().map(|(_, id)| id).collect();
    Ok(World {
        addr,
        users,
        conns,
        chats,
    })
}

/// Sets up and runs the scenario; the report of the measured window.
async fn bench(args: BenchArgs, addr: String, embedded: bool) -> Result<Report, CliError> {
    if args.scenario == Scenario::Fanout {
        // Its own setup: one channel, its members and the worker processes.
        let mut report = fanout::fanout(&args, &addr, embedded).await?;
        report.config = args.config();
        report.command = args.command();
        return Ok(report);
    }
    let world = setup(&args, addr).await?;
    let mut report = match args.scenario {
        Scenario::Send => scenarios::send_or_mixed(&args, &world, false, embedded).await,
        Scenario::Mixed => scenarios::send_or_mixed(&args, &world, true, embedded).await,
        Scenario::Sync => scenarios::sync(&args, &world, embedded).await?,
        Scenario::Subscribe => scenarios::subscribe(&args, &world, embedded).await?,
        Scenario::Catchup => catchup::catchup(&args, &world, embedded).await?,
        Scenario::Media => media::media(&args, &world, embedded).await?,
        Scenario::Fanout | Scenario::FanoutWorker => unreachable!("handled above"),
    };
    report.config = args.config();
    report.command = args.command();
    Ok(report)
}
