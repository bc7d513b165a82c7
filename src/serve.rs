//! `chatlog serve`: one node of a cluster, or the embedded single-node default.
//!
//! What it owns: turning flags into a `NodeConfig`, starting the node (storage engine
//! and every local group replica), the client gateway and, in a cluster, the peer
//! listener, and the HTTP port (`crate::http`: health, readiness, metrics, admin);
//! announcing the bound addresses on stdout (scripts and tests read them);
//! and an orderly stop on SIGINT or SIGTERM (stop accepting, stop groups, close the
//! engine). What it must not do: implement any of those parts.

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
    /// `--initial-cluster`).
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
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
    /// Size of the storage engine's segment files in MiB (default 64; at least 1). Each
    /// segment is preallocated in full, so a small disk wants small segments.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=2048))]
    pub segment_mb: Option<u64>,
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

/// Runs `chatlog serve` until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    if args.groups == 0 || args.groups >= GROUPS_MAX {
        return Err(format!("--groups must be 1 to {}", GROUPS_MAX - 1).into());
    }
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
    let config = NodeConfig {
        node_id: args.node_id,
        data_dir: args.data_dir.clone(),
        groups: args.groups,
        replicas,
        members,
        sm: Default::default(),
        segment_bytes: args.segment_mb.map(|mb| mb << 20),
        heartbeat_ms: args.heartbeat_ms,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chatlog")
        .build()?;
    runtime.block_on(serve(args, config, cluster))
}

/// The cluster id every node of an initial cluster derives alike: FNV-1a over the
/// sorted `id=addr` entries. Frames between nodes of different clusters are refused.
fn cluster_id(cluster: &BTreeMap<u64, SocketAddr>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, addr) in cluster {
        for b in format!("{id}={addr};").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

async fn serve(
    args: ServeArgs,
    config: NodeConfig,
    cluster: BTreeMap<u64, SocketAddr>,
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
    let (stop_peers, peers_stopped) = tokio::sync::watch::channel(false);
    let mut peer_server = None;
    let node = if cluster.is_empty() {
        Node::start(config, |_| NoPeers, Arc::clone(&registry)).await?
    } else {
        let identity = NodeIdentity {
            cluster_id: cluster_id(&cluster),
            node_id: args.node_id,
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
        println!("peers: {}", listener.local_addr()?);
        let directory: Arc<dyn GroupDirectory> = media_directory.clone();
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
        let mut node =
            Node::start(config, move |g| r.network_factory(g), Arc::clone(&registry)).await?;
        // Proposals and reads for groups this node does not lead go to their leader.
        node.set_router(router);
        node
    };
    let node = Arc::new(node);
    // The HTTP port answers from here on: `/ready` says when the groups have leaders.
    let clients = Arc::new(ClientCounters::default());
    let http_ctx = Arc::new(HttpContext {
        node: Arc::clone(&node),
        peers: cluster.clone(),
        clients_addr: OnceLock::new(),
        http_addr,
        admin_token: args.admin_token.clone().filter(|t| !t.is_empty()),
        clients: Arc::clone(&clients),
        changes: LeaderChanges::watch(&node),
        started,
    });
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
    let service = Arc::new(CountedService::new(chat_service, clients));
    gateway::serve(
        listener,
        service,
        GatewayLimits {
            push_queue_len_max: args.push_queue_len.max(1),
            push_queue_bytes_max: args.push_queue_bytes.max(1),
            ..GatewayLimits::default()
        },
        shutdown_signal(),
    )
    .await;
    tracing::info!("stopping");
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
