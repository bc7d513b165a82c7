//! `chatlog serve`: one node of a cluster, or the embedded single-node default.
//!
//! What it owns: turning flags into a `NodeConfig`, starting the node (storage engine
//! and every local group replica), the client gateway and, in a cluster, the peer
//! listener, and the HTTP port (`crate::http`: health, readiness, metrics, admin);
//! announcing the bound addresses on stdout (scripts and tests read them);
//! and an orderly stop on SIGINT or SIGTERM (stop accepting, hand off leaderships, stop
//! groups, close the engine). What it must not do: implement any of those parts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chatlog_raft::chat::GROUPS_MAX;
use chatlog_raft::network::{GroupDirectory, NodeIdentity, Router};
use chatlog_raft::node::{GroupRegistry, NoPeers, Node, NodeConfig};
use clap::{ArgAction, Args};

use crate::cli::CliError;
use crate::gateway::{self, GatewayLimits};
use crate::http::{ClientCounters, CountedService, HttpContext, LeaderChanges};
use crate::notify::{Notifier, NotifyConfig};
use crate::service::ChatService;

/// Default client address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// How long startup waits for every local group to have a leader before serving anyway.
const LEADER_WAIT: Duration = Duration::from_secs(20);
/// Longest shutdown waits for HTTP requests in progress (each is bounded anyway).
const HTTP_STOP_WAIT: Duration = Duration::from_secs(5);
/// Default number of chat groups.
pub const DEFAULT_GROUPS: u64 = 16;

/// Flags of `chatlog serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where this node keeps its data (created if missing). Restarting with the same
    /// directory recovers everything acknowledged.
    #[arg(long, default_value = "chatlog-data")]
    pub data_dir: PathBuf,
    /// Address for client connections (port 0 picks a free port; the bound address is
    /// printed as `clients: ADDR`).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// This node's id in the cluster.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// Every node of the initial cluster as `ID=HOST:PORT,...` (peer addresses). Without
    /// it the node runs alone with every group local (replication factor 1).
    #[arg(long, value_delimiter = ',')]
    pub initial_cluster: Vec<String>,
    /// Address for node-to-node traffic (defaults to this node's entry in
    /// `--initial-cluster`; with `--join`, required, and the address other nodes dial).
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// Join a running cluster instead of starting one: the HTTP address of any of its
    /// nodes. The node reads the cluster's id and members there, starts with no
    /// replicas, registers itself (`admin node add` with its `--peer-listen` address)
    /// and then follows the controller group 0; replicas come to it by `admin replica
    /// move` or `admin rebalance`. Give the same flag on every restart. Needs
    /// `--admin-token` if the cluster's nodes run with one.
    #[arg(long, value_name = "HTTP_ADDR", conflicts_with = "initial_cluster")]
    pub join: Option<String>,
    /// Chat groups in the cluster (fixed at creation; every node must agree).
    #[arg(long, default_value_t = DEFAULT_GROUPS)]
    pub groups: u64,
    /// Replicas per group (default: 3 in a cluster, 1 alone).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Development mode: user creation needs no session and returns a login token.
    /// A real deployment turns it off and delivers login codes out of band.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub dev_mode: bool,
    /// Raft heartbeat interval in milliseconds (default: scaled by the group count).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Log retention: keep about the newest N Raft entries of each group and purge older
    /// ones from disk (default: keep everything). History below a chat's first retained
    /// event is no longer served: a read from an older seq starts at the first retained
    /// one. Entries holding pending secret messages and entries above the last checkpoint
    /// are kept regardless. The policy is replicated state of each group: this flag only
    /// seeds a group that has none yet (its leader proposes it); afterwards
    /// `chatlog admin retention set` changes it and a restart with other flags changes
    /// nothing (a node logs the difference). Every node must still run with the same
    /// value (peers with other flags refuse each other's handshake).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub retain_entries: Option<u64>,
    /// Log retention by size: keep the newest Raft entries of each group whose bytes sum
    /// to at least B (plus less than 64 entries) and purge older ones; with `--retain-entries`
    /// too, the stricter limit wins. Default: no size limit. Seeds the replicated policy
    /// and must be the same on every node, like `--retain-entries`.
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u64).range(1..))]
    pub retain_bytes: Option<u64>,
    /// Size of the storage engine's segment files in MiB (default 64; at least 1). Each
    /// segment is preallocated in full, so a small disk wants small segments.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=2048))]
    pub segment_mb: Option<u64>,
    /// How the storage engine writes: `auto` (io_uring when the kernel allows it,
    /// otherwise pwrite + fdatasync; container seccomp profiles often block io_uring),
    /// `io-uring` (refuse to start without it) or `syscall` (pwrite + fdatasync). The
    /// backend in use is logged at start (`node started … io=…`).
    #[arg(long, value_enum, default_value_t = IoBackendArg::Auto)]
    pub io_backend: IoBackendArg,
    /// Messages (sends, edits, deletes, reactions, pins, new chats) per second per user,
    /// with a burst of as many; over it a request gets RATE_LIMITED with a retry-after.
    /// 0 turns the limit off (load tests).
    #[arg(long, default_value_t = crate::service::ratelimit::USER_SENDS_PER_SEC)]
    pub user_sends_per_sec: f64,
    /// Requests per second per connection, with a burst of as many; 0 turns it off.
    #[arg(long, default_value_t = crate::service::ratelimit::CONN_REQUESTS_PER_SEC)]
    pub conn_requests_per_sec: f64,
    /// Address of the HTTP port: `/health`, `/ready`, `/metrics`, `/admin/…` (default: the
    /// client address with its port + 80, so 127.0.0.1:7480 for the default 7400, and
    /// port 0 when the client port is 0). The bound address is printed as `http: ADDR`.
    /// A busy address stops startup.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Token the admin endpoints (`/admin/…`) require as `Authorization: Bearer TOKEN`.
    /// Without one they answer only peers on a loopback address.
    #[arg(long, env = "CHATLOG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Most pushes (live events, user events) queued for one connection; a connection
    /// further behind is closed with `Disconnect(RATE_LIMITED)` and catches up with
    /// `sync` after reconnecting.
    #[arg(long, default_value_t = gateway::PUSH_QUEUE_LEN_MAX, value_parser = clap::value_parser!(usize))]
    pub push_queue_len: usize,
    /// Most client connections open at once; more are refused with
    /// `Disconnect(UNAVAILABLE)`. Each is one open file: the server raises its soft limit
    /// on open files to the hard limit at start and warns when this does not fit in it.
    #[arg(long, default_value_t = gateway::CONNECTIONS_MAX, value_parser = clap::value_parser!(usize))]
    pub max_connections: usize,
    /// Bytes of pushes queued per connection (one push is always taken): a live push
    /// beyond closes the connection as a slow reader; a subscription catching up waits.
    #[arg(long, default_value_t = gateway::PUSH_QUEUE_BYTES_MAX, value_parser = clap::value_parser!(usize))]
    pub push_queue_bytes: usize,
    /// Seconds after which an unfinished media upload is deleted and its disk space
    /// freed (default one day).
    #[arg(long, default_value_t = crate::media::store::UPLOAD_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub media_upload_ttl_secs: u64,
    /// Bytes all unfinished media uploads on this node may reserve together; an upload
    /// past it is refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = crate::media::store::RESERVED_BYTES_MAX)]
    pub media_reserved_bytes: u64,
    /// Push notifications for members without an online session: POSTed as JSON to this
    /// `http://host:port/path` (where a deployment plugs in APNs or FCM), collapsed per
    /// user and chat, kept in a durable outbox until the webhook answers 2xx. Off when
    /// not given. Notifications carry counts and seqs, never message text.
    #[arg(long, value_name = "URL")]
    pub push_webhook: Option<String>,
    /// Sent to the push webhook as `Authorization: Bearer TOKEN`.
    #[arg(long, env = "CHATLOG_PUSH_WEBHOOK_TOKEN", hide_env_values = true)]
    pub push_webhook_token: Option<String>,
    /// Notifications of one user and chat within this many milliseconds become one.
    #[arg(long, default_value_t = crate::notify::COLLAPSE_DEFAULT.as_millis() as u64)]
    pub push_collapse_ms: u64,
}

/// The push notifier's configuration, if `--push-webhook` is given.
fn notify_config(args: &ServeArgs) -> Result<Option<NotifyConfig>, CliError> {
    let Some(url) = &args.push_webhook else {
        return Ok(None);
    };
    let collapse = Duration::from_millis(args.push_collapse_ms.max(1));
    Ok(Some(NotifyConfig::parse(
        url,
        args.push_webhook_token.clone(),
        collapse,
    )?))
}

/// The HTTP address: `--http`, else the client address with port + 80 (0 stays 0).
fn http_addr(args: &ServeArgs) -> Result<SocketAddr, CliError> {
    if let Some(a) = args.http {
        return Ok(a);
    }
    let mut a = args.listen;
    if a.port() != 0 {
        let port = a
            .port()
            .checked_add(crate::http::DEFAULT_PORT_OFFSET)
            .ok_or("--listen port too high to derive the HTTP port: pass --http")?;
        a.set_port(port);
    }
    Ok(a)
}

fn parse_cluster(entries: &[String]) -> Result<BTreeMap<u64, SocketAddr>, CliError> {
    let mut out = BTreeMap::new();
    for e in entries {
        let (id, addr) = e
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster entry {e:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| format!("--initial-cluster entry {e:?}: {id:?} is not a node id"))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("--initial-cluster entry {e:?}: {addr:?} is not HOST:PORT"))?;
        if id == 0 || out.insert(id, addr).is_some() {
            return Err(format!("--initial-cluster names node {id} twice or uses id 0").into());
        }
    }
    Ok(out)
}

/// Fault injection for tests (`tests/clock_jump.rs`): names a file holding a signed
/// number of milliseconds that the node adds to its wall clock, re-read every
/// [`FAULT_CLOCK_POLL`]; writing to the file makes the node's clock jump. Never set it
/// in production.
pub const FAULT_CLOCK_ENV: &str = "CHATLOG_FAULT_CLOCK_OFFSET_FILE";
/// How often the file named by [`FAULT_CLOCK_ENV`] is read.
const FAULT_CLOCK_POLL: Duration = Duration::from_millis(20);

/// Follows the fault clock file on a thread of its own for the life of the process.
fn follow_fault_clock(path: PathBuf) {
    tracing::warn!(file = %path.display(), "fault injection: the wall clock follows an offset file");
    std::thread::spawn(move || {
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(offset) = text.trim().parse::<i64>()
            {
                chatlog_raft::clock::set_fault_offset_ms(offset);
            }
            std::thread::sleep(FAULT_CLOCK_POLL);
        }
    });
}

/// What a joining node learns from the cluster it joins (`GET /admin/cluster`).
struct JoinInfo {
    cluster_id: u64,
    members: BTreeMap<u64, SocketAddr>,
    user_groups: u64,
    replication: usize,
}

/// Longest `--join` waits for the named node's answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

async fn join_info(http: &str, token: Option<&str>) -> Result<JoinInfo, CliError> {
    let r = crate::http::client::request(http, "GET", "/admin/cluster", token, None, JOIN_TIMEOUT)
        .await
        .map_err(|e| format!("--join {http}: {e}"))?;
    if r.status != 200 {
        return Err(format!("--join {http}: HTTP {}: {}", r.status, r.text().trim()).into());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| format!("--join {http}: not JSON: {e}"))?;
    let p = &v["placement"];
    let mut members = BTreeMap::new();
    for m in p["members"].as_array().into_iter().flatten() {
        if let (Some(id), Some(addr)) = (
            m["id"].as_u64(),
            m["addr"].as_str().and_then(|a| a.parse().ok()),
        ) {
            members.insert(id, addr);
        }
    }
    let (Some(cluster_id), Some(user_groups), Some(replication)) = (
        v["cluster_id"].as_u64(),
        p["user_groups"].as_u64(),
        p["replication"].as_u64(),
    ) else {
        return Err(format!("--join {http}: the answer lacks the cluster id or placement").into());
    };
    if members.is_empty() {
        return Err(format!("--join {http}: the cluster names no member with an address").into());
    }
    Ok(JoinInfo {
        cluster_id,
        members,
        user_groups,
        replication: replication as usize,
    })
}

/// Runs `chatlog serve` until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    // Every client connection is an open file (fanout: 15,000 subscribers on one node).
    let open_files = gateway::raise_open_files_limit();
    if open_files > 0 && (args.max_connections as u64).saturating_add(256) > open_files {
        tracing::warn!(
            open_files,
            max_connections = args.max_connections,
            "--max-connections does not fit in the open files limit (less 256 for data files)"
        );
    }
    if args.join.is_some() {
        return run_joining(args);
    }
    if args.groups == 0 || args.groups >= GROUPS_MAX {
        return Err(format!("--groups must be 1 to {}", GROUPS_MAX - 1).into());
    }
    notify_config(&args)?;
    let cluster = parse_cluster(&args.initial_cluster)?;
    if !cluster.is_empty() && !cluster.contains_key(&args.node_id) {
        return Err(format!(
            "--initial-cluster does not name this node ({})",
            args.node_id
        )
        .into());
    }
    let members: BTreeSet<u64> = if cluster.is_empty() {
        BTreeSet::from([args.node_id])
    } else {
        cluster.keys().copied().collect()
    };
    let replicas = args
        .replicas
        .unwrap_or(if cluster.is_empty() { 1 } else { 3 })
        .min(members.len());
    if replicas == 0 {
        return Err("--replicas must be at least 1".into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("creating {}: {e}", args.data_dir.display()))?;
    if let Some(path) = std::env::var_os(FAULT_CLOCK_ENV) {
        follow_fault_clock(PathBuf::from(path));
    }
    let config = NodeConfig {
        node_id: args.node_id,
        data_dir: args.data_dir.clone(),
        groups: args.groups,
        replicas,
        members,
        sm: sm_config(&args),
        segment_bytes: args.segment_mb.map(|mb| mb << 20),
        heartbeat_ms: args.heartbeat_ms,
        io_mode: args.io_backend.into(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chatlog")
        .build()?;
    let id = cluster_id(&cluster);
    runtime.block_on(serve(args, config, cluster, id))
}

/// `chatlog serve --io-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoBackendArg {
    /// io_uring when the kernel allows it, otherwise pwrite + fdatasync.
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// pwrite + fdatasync.
    Syscall,
}

impl From<IoBackendArg> for chatlog_storage::IoMode {
    fn from(arg: IoBackendArg) -> Self {
        match arg {
            IoBackendArg::Auto => chatlog_storage::IoMode::Auto,
            IoBackendArg::IoUring => chatlog_storage::IoMode::Uring,
            IoBackendArg::Syscall => chatlog_storage::IoMode::Syscall,
        }
    }
}

/// The state machine knobs the flags give (retention: `--retain-entries`, the seed of a
/// group's replicated policy).
fn sm_config(args: &ServeArgs) -> chatlog_raft::state_machine::SmConfig {
    chatlog_raft::state_machine::SmConfig {
        retention: chatlog_raft::chat::retention::RetentionPolicy {
            retain_entries: args.retain_entries,
            retain_bytes: args.retain_bytes,
        },
        ..Default::default()
    }
}

/// `chatlog serve --join HTTP_ADDR`: a new member of a running cluster.
fn run_joining(args: ServeArgs) -> Result<(), CliError> {
    let join = args.join.clone().unwrap_or_default();
    let Some(peer_listen) = args.peer_listen else {
        return Err("--join needs --peer-listen ADDR (the address other nodes dial)".into());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chatlog")
        .build()?;
    let token = args.admin_token.clone().filter(|t| !t.is_empty());
    let info = runtime.block_on(join_info(&join, token.as_deref()))?;
    let mut cluster = info.members.clone();
    // Its own address goes in the peer table too (the listener binds it).
    cluster.insert(args.node_id, peer_listen);
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("creating {}: {e}", args.data_dir.display()))?;
    let config = NodeConfig {
        node_id: args.node_id,
        data_dir: args.data_dir.clone(),
        groups: info.user_groups,
        replicas: info.replication,
        // The members it found, without itself: a joining node never initializes a group
        // from the static flags, it learns every group from the others.
        members: info
            .members
            .keys()
            .copied()
            .filter(|n| *n != args.node_id)
            .collect(),
        sm: sm_config(&args),
        segment_bytes: None,
        heartbeat_ms: args.heartbeat_ms,
        io_mode: args.io_backend.into(),
    };
    runtime.block_on(serve(args, config, cluster, info.cluster_id))
}

/// Registers this joining node with the cluster (idempotent), retrying while group 0 is
/// electing.
async fn register(
    join: &str,
    token: Option<&str>,
    node: u64,
    addr: SocketAddr,
) -> Result<(), CliError> {
    let body = serde_json::json!({"node": node, "addr": addr.to_string()}).to_string();
    let deadline = std::time::Instant::now() + LEADER_WAIT;
    loop {
        let r = crate::http::client::request(
            join,
            "POST",
            "/admin/node-add",
            token,
            Some(body.as_bytes()),
            JOIN_TIMEOUT,
        )
        .await;
        match r {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) if r.status == 409 || r.status == 400 => {
                return Err(format!("--join {join}: node add refused: {}", r.text().trim()).into());
            }
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(r) => return Err(format!("--join {join}: node add: {}", r.text().trim()).into()),
            Err(e) => return Err(format!("--join {join}: node add: {e}").into()),
        }
    }
}

/// The cluster id every node of an initial cluster derives alike: FNV-1a over the
/// sorted `id=addr` entries. Frames between nodes of different clusters are refused.
fn cluster_id(cluster: &BTreeMap<u64, SocketAddr>) -> u64 {
    cluster
        .iter()
        .fold(chatlog_raft::codec::FNV1A_OFFSET, |h, (id, addr)| {
            chatlog_raft::codec::fnv1a_update(h, format!("{id}={addr};").as_bytes())
        })
}

async fn serve(
    args: ServeArgs,
    config: NodeConfig,
    cluster: BTreeMap<u64, SocketAddr>,
    cluster_id: u64,
) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    // Bound first, so a busy HTTP address stops startup before any data is opened.
    let http_listener = crate::http::bind(http_addr(&args)?).await?;
    let http_addr = http_listener.local_addr()?;
    let registry = Arc::new(GroupRegistry::default());
    // The peer server's view of the groups, plus media parts from other replicas.
    let media_directory = Arc::new(crate::media::replicate::MediaDirectory::new(
        registry.clone(),
    ));
    // ... and fan-out polls from nodes without a replica (answered by the hub, set below).
    let fanout_directory = Arc::new(crate::fanout::FanoutDirectory::new(media_directory.clone()));
    // The bot API's way to media, bound once the chat service started the media side.
    let media_link = Arc::new(crate::service::MediaLink::default());
    let (stop_peers, peers_stopped) = tokio::sync::watch::channel(false);
    let mut peer_server = None;
    let node = if cluster.is_empty() {
        Node::start(config, |_| NoPeers, Arc::clone(&registry)).await?
    } else {
        let identity = NodeIdentity {
            retention: config.sm.retention,
            ..NodeIdentity::new(cluster_id, args.node_id)
        };
        let router = Router::new(identity);
        for (id, addr) in &cluster {
            if *id != args.node_id {
                router.set_peer_addr(*id, *addr);
            }
        }
        let peer_addr = args.peer_listen.unwrap_or(cluster[&args.node_id]);
        let listener = tokio::net::TcpListener::bind(peer_addr)
            .await
            .map_err(|e| format!("binding the peer address {peer_addr}: {e}"))?;
        let bound_peer = listener.local_addr()?;
        println!("peers: {bound_peer}");
        let directory: Arc<dyn GroupDirectory> = fanout_directory.clone();
        let mut stopped = peers_stopped.clone();
        peer_server = Some(tokio::spawn(chatlog_raft::network::serve(
            listener,
            identity,
            directory,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
        let r = router.clone();
        let addrs = cluster.iter().map(|(id, a)| (*id, a.to_string())).collect();
        // Proposals and reads for groups this node does not lead go to their leader.
        let node = Node::start_with(
            config,
            move |g| r.network_factory(g),
            Arc::clone(&registry),
            Some(router),
            addrs,
        )
        .await?;
        if let Some(join) = &args.join {
            let token = args.admin_token.as_deref().filter(|t| !t.is_empty());
            let advertised = args
                .peer_listen
                .filter(|a| a.port() != 0)
                .unwrap_or(bound_peer);
            register(join, token, args.node_id, advertised).await?;
        }
        node
    };
    let node = Arc::new(node);
    // Follows the placement in group 0 and carries out cluster changes.
    let controller = chatlog_raft::controller::spawn(&node);
    // Issue 9: a replica whose Raft log a read finds damaged is cut and restarted
    // repairing (`chatlog_raft::damage_watch`).
    let _damage_watch = chatlog_raft::damage_watch::spawn(&node);
    // The HTTP port answers from here on: `/ready` says when the groups have leaders.
    let clients = Arc::new(ClientCounters::default());
    let rate_limits = crate::service::ratelimit::RateLimits {
        user_sends_per_sec: args.user_sends_per_sec,
        conn_requests_per_sec: args.conn_requests_per_sec,
    };
    let http_ctx = Arc::new(HttpContext {
        node: Arc::clone(&node),
        peers: cluster.clone(),
        clients_addr: OnceLock::new(),
        http_addr,
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        clients: Arc::clone(&clients),
        changes: LeaderChanges::watch(&node),
        started,
        bots: crate::bot::BotApi::start_with_media(
            Arc::clone(&node),
            rate_limits,
            Arc::clone(&media_link) as Arc<dyn crate::bot::MediaResolver>,
        ),
        cluster_id,
    });
    // Bot calls other nodes forward (`bot/forward.rs`) are answered from here on.
    fanout_directory.set_bots(&http_ctx.bots);
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let http_server = tokio::spawn(crate::http::serve(
        http_listener,
        Arc::clone(&http_ctx),
        async move {
            let mut stopped = http_stopped;
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    println!("http: {http_addr}");
    if let Err(e) = node.wait_for_leaders(LEADER_WAIT).await {
        // In a cluster the other nodes may still be starting; the groups keep trying.
        tracing::warn!(error = %e, "not every group has a leader yet");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("binding the client address {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        node = node.node_id(),
        groups = args.groups,
        data_dir = %args.data_dir.display(),
        io = ?node.engine().io_backend(),
        startup_ms = started.elapsed().as_millis() as u64,
        "node started"
    );
    // Scripts and tests read this line to find the port.
    println!("clients: {addr}");
    let _ = http_ctx.clients_addr.set(addr);
    let chat_service = ChatService::with_media(
        Arc::clone(&node),
        args.dev_mode,
        crate::service::ratelimit::RateLimits {
            user_sends_per_sec: args.user_sends_per_sec,
            conn_requests_per_sec: args.conn_requests_per_sec,
        },
        crate::media::store::StoreConfig {
            upload_ttl: Duration::from_secs(args.media_upload_ttl_secs),
            reserved_bytes_max: args.media_reserved_bytes,
            ..Default::default()
        },
    );
    media_directory.set_media(std::sync::Arc::clone(chat_service.media()));
    fanout_directory.set_hub(chat_service.hub());
    if let Some(config) = notify_config(&args)? {
        tracing::info!(webhook = %args.push_webhook.as_deref().unwrap_or_default(), "push notifications on");
        chat_service
            .hub()
            .set_notifier(Notifier::start(Arc::clone(&node), config));
    }
    let service = Arc::new(CountedService::new(chat_service, clients));
    fanout_directory.set_service(&service);
    media_link.set(&service);
    gateway::serve(
        listener,
        service,
        GatewayLimits {
            push_queue_len_max: args.push_queue_len.max(1),
            connections_max: args.max_connections.max(1),
            push_queue_bytes_max: args.push_queue_bytes.max(1),
            ..GatewayLimits::default()
        },
        shutdown_signal(),
    )
    .await;
    tracing::info!("stopping");
    controller.abort();
    let _ = controller.await;
    // ---- leadership hand-off before the groups stop (crate::handoff) ----
    let (moved, asked) = crate::handoff::hand_off_leadership(&node).await;
    tracing::info!(moved, asked, "leadership handed off");
    // ---- end hand-off ----
    let _ = stop_http.send(true);
    drop(http_ctx);
    let mut http_server = http_server;
    if tokio::time::timeout(HTTP_STOP_WAIT, &mut http_server)
        .await
        .is_err()
    {
        http_server.abort();
    }
    match Arc::try_unwrap(node) {
        Ok(node) => node.shutdown().await?,
        Err(node) => {
            // A request task still holds it: stop the groups; the engine flushes and
            // closes when the last handle drops.
            tracing::warn!("node still referenced at shutdown; stopping groups only");
            for g in node.groups() {
                let _ = g.raft().shutdown().await;
            }
        }
    }
    let _ = stop_peers.send(true);
    if let Some(p) = peer_server {
        let _ = p.await;
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
