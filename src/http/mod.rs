//! The node's HTTP port (`chatlog serve --http ADDR`): health, readiness, Prometheus
//! metrics and the admin API.
//!
//! What it owns: the routes, the admin token check, turning openraft's per-group metrics
//! and the engine's stats into JSON, Prometheus text and the status page, and the leader-transfer
//! operation (trigger, then a bounded wait for the new leader). What it must not do:
//! change how a group replicates or stores; it only reads metrics and pulls openraft's
//! documented triggers.
//!
//! Endpoints:
//! - `GET /`: the status page for people (`page.rs`): the `/admin/status` JSON as HTML,
//!   reloading itself; the admin rule below, plus the token as a Basic-auth password.
//! - `GET /health`: `200 ok` while the process runs.
//! - `GET /ready`: `200` when every local group runs and knows a leader (this node or
//!   another), else `503` with `{"ready": false, "groups_without_leader": [G, …]}`.
//! - `GET /metrics`: Prometheus text (`metrics.rs` lists every metric).
//! - `GET /admin/status`: `{"node": {…}, "nodes": […], "groups": […], "summary": "…"}`.
//! - `POST /admin/leader-transfer` with `{"group": G, "to": N}`.
//! - `GET|POST /bot{TOKEN}/{method}` and `GET /bot/openapi.json`: the HTTP bot API
//!   (`bot.rs`, `crate::bot`, docs/bots.md); its errors have Telegram's shape instead.
//! - `POST /admin/compact` (secret chats): waits for the erasers, seals the active
//!   segment, compacts; see `compact.rs`.
//! - Cluster changes (`cluster.rs`): `GET /admin/cluster`, `POST /admin/node-add`,
//!   `/admin/node-remove`, `/admin/replica-move`, `/admin/group-add`, `/admin/rebalance`.
//! - Retention (`retention.rs`): `GET /admin/retention` (each local replica's replicated
//!   policy, horizon and state digest), `POST /admin/retention` (sets every group's policy).
//! - Backups (`crate::backup::serve`): `GET /admin/backup` (what this node holds),
//!   `GET /admin/backup/group/{g}` (one group's copy, streamed),
//!   `GET /admin/backup/media/{sha256 hex}` (one media file, streamed).
//!
//! Admin endpoints (`/admin/…`) need `Authorization: Bearer TOKEN` when the node runs
//! with `--admin-token` (or `CHATLOG_ADMIN_TOKEN`): a missing or wrong token gets 401.
//! Without a token they answer only peers on a loopback address (others get 403), which
//! is enough for the embedded single node. `/health`, `/ready` and `/metrics` are open.
//!
//! Errors are JSON: `{"code": "BAD_REQUEST" | "NOT_FOUND" | "NOT_LEADER" |
//! "UNAUTHENTICATED" | "PERMISSION_DENIED" | "TIMEOUT" | "UNAVAILABLE", "error": "…"}`
//! (plus `"leader"` for `NOT_LEADER`). Every handler is bounded by [`HANDLER_TIMEOUT`]
//! (leader transfer by [`TRANSFER_WAIT`] on top).

mod bot;
pub mod client;
pub mod cluster;
mod compact;
mod counters;
mod disk;
mod metrics;
mod page;
pub mod retention;
mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chatlog_raft::NodeId;
use chatlog_raft::node::Node;
use serde_json::{Value, json};

pub use counters::{ClientCounters, CountedService};
pub use disk::human_bytes;
use status::GroupView;
pub use status::LeaderChanges;

/// The HTTP port's default offset from the client port: `--listen 127.0.0.1:7400` gives
/// `--http 127.0.0.1:7480`.
pub const DEFAULT_PORT_OFFSET: u16 = 80;

/// Longest any handler takes before answering `503 TIMEOUT` (apart from the wait of a
/// leader transfer). Why: every handler only reads in-memory metrics; this bounds a
/// stalled lock or a slow trigger.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a leader transfer waits for the group's leader to change. Why: the new
/// leader's election takes one round trip after its log caught up; a follower far
/// behind may need longer, and then the caller sees `TIMEOUT` and can look at `status`.
pub const TRANSFER_WAIT: Duration = Duration::from_secs(10);

/// Largest request body accepted (admin requests are a few dozen bytes).
pub const BODY_BYTES_MAX: usize = 4096;

/// What the HTTP port serves from.
#[derive(Debug)]
pub struct HttpContext {
    pub node: Arc<Node>,
    /// Peer address of every node of the initial cluster (empty alone).
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// This node's client address, once the gateway listens.
    pub clients_addr: OnceLock<SocketAddr>,
    /// This node's HTTP address.
    pub http_addr: SocketAddr,
    /// `--admin-token`; `None`: admin endpoints answer loopback peers only.
    pub admin_token: Option<String>,
    pub clients: Arc<ClientCounters>,
    pub changes: LeaderChanges,
    pub started: Instant,
    /// The HTTP bot API (`/bot{TOKEN}/{method}`).
    pub bots: Arc<crate::bot::BotApi>,
    /// The cluster id peers check on every frame (a joining node asks for it).
    pub cluster_id: u64,
}

type Ctx = Arc<HttpContext>;

/// Binds the HTTP address; the error names it.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the HTTP address {addr} (--http): {e}"))
}

/// The routes.
pub fn router(ctx: Ctx) -> Router {
    Router::new()
        // The status page for people (page.rs).
        .route("/", get(status_page))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_handler))
        .route("/admin/status", get(admin_status))
        .route("/admin/leader-transfer", post(leader_transfer))
        // The HTTP bot API (issue 11).
        .merge(bot::routes())
        // ---- secret chats: forced erasure from disk (compact.rs) ----
        .route("/admin/compact", post(admin_compact))
        // ---- end secret chats ----
        // ---- cluster changes (cluster.rs) ----
        .route("/admin/cluster", get(cluster::cluster))
        .route("/admin/node-add", post(cluster::node_add))
        .route("/admin/node-remove", post(cluster::node_remove))
        .route("/admin/replica-move", post(cluster::replica_move))
        .route("/admin/group-add", post(cluster::group_add))
        .route("/admin/rebalance", post(cluster::rebalance))
        // ---- end cluster changes ----
        // ---- retention policy (retention.rs, s8retention) ----
        .merge(retention::routes())
        // ---- end retention policy ----
        // ---- backup (crate::backup::serve) ----
        .merge(crate::backup::serve::routes())
        // ---- end backup ----
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(ctx)
}

/// Serves `listener` until `shutdown` completes (requests in progress finish first).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Ctx,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = router(ctx).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "the HTTP server stopped");
    }
}

/// A JSON error answer.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    json_error(status, json!({"code": code, "error": message.into()}))
}

fn json_error(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Runs `f` within `limit`, answering `503 TIMEOUT` past it.
async fn bounded(limit: Duration, f: impl std::future::Future<Output = Response>) -> Response {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            format!("no answer within {limit:?}"),
        ),
    }
}

/// Checks the admin token, or the loopback rule without one.
#[allow(clippy::result_large_err)]
pub(crate) fn authorize(
    ctx: &HttpContext,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), Response> {
    let Some(expected) = &ctx.admin_token else {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(error(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "admin endpoints answer only loopback peers when the node runs without \
                 --admin-token",
            ))
        };
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "wrong admin token",
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "this endpoint needs `Authorization: Bearer TOKEN` (the node's --admin-token)",
        )),
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> &'static str {
    "ok\n"
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
}

fn views(ctx: &HttpContext) -> Vec<GroupView> {
    status::groups(&ctx.node, &ctx.changes)
}

async fn ready(State(ctx): State<Ctx>) -> Response {
    bounded(HANDLER_TIMEOUT, async move {
        let groups = views(&ctx);
        let missing: Vec<u64> = groups.iter().filter(|g| !g.ready()).map(|g| g.id).collect();
        if missing.is_empty() {
            (
                StatusCode::OK,
                axum::Json(json!({"ready": true, "groups": groups.len()})),
            )
                .into_response()
        } else {
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "groups_without_leader": missing}),
            )
        }
    })
    .await
}

async fn metrics_handler(State(ctx): State<Ctx>) -> Response {
    bounded(HANDLER_TIMEOUT, async move {
        let groups = views(&ctx);
        let data_dir = ctx.node.config().data_dir.clone();
        let disk = tokio::task::spawn_blocking(move || disk::usage(&data_dir))
            .await
            .unwrap_or_default();
        let body = metrics::render(
            &ctx.node,
            &groups,
            &ctx.clients,
            ctx.started.elapsed().as_secs_f64(),
            &disk,
        );
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response()
    })
    .await
}

/// Longest a status waits for a peer whose liveness the heartbeats do not tell (no group
/// led here replicates to it) to answer a probe on its peer port. Why: a live peer
/// answers within a round trip; status must stay quick when a node is down (probes run
/// concurrently, so this bounds the whole wait).
pub const STATUS_PROBE_WAIT: Duration = Duration::from_millis(500);

/// The body of `GET /admin/status` (and what the status page at `/` shows).
async fn status_json(ctx: &Ctx) -> Value {
    // ---- ops status (issue 7): probes for peers the heartbeats say nothing of, disk ----
    let placement = ctx.node.placement();
    let groups = views(ctx);
    let me = ctx.node.node_id();
    let mut probes = tokio::task::JoinSet::new();
    for &id in placement.members.keys() {
        if id != me && status::peer_liveness(&groups, id).0.is_none() {
            let node = Arc::clone(&ctx.node);
            probes.spawn(async move { (id, node.peer_answers(id, STATUS_PROBE_WAIT).await) });
        }
    }
    let data_dir = ctx.node.config().data_dir.clone();
    let disk = tokio::task::spawn_blocking(move || disk::usage(&data_dir))
        .await
        .unwrap_or_default();
    let mut probed = BTreeMap::new();
    while let Some(r) = probes.join_next().await {
        if let Ok((id, up)) = r {
            probed.insert(id, up);
        }
    }
    // ---- end ops status ----
    let me = ctx.node.node_id();
    let stats = ctx.node.engine().stats();
    let mut nodes = Vec::new();
    let mut down = Vec::new();
    for &id in placement.members.keys() {
        let peer = placement
            .members
            .get(&id)
            .map(|m| m.addr.clone())
            .filter(|a| !a.is_empty())
            .or_else(|| ctx.peers.get(&id).map(|a| a.to_string()));
        if id == me {
            nodes.push(
                json!({"id": id, "self": true, "up": true, "peer_addr": peer,
                              "version": env!("CARGO_PKG_VERSION")}),
            );
        } else {
            let (up, last_ack_ms) = status::peer_liveness(&groups, id);
            let up = up.or_else(|| probed.get(&id).copied());
            if up == Some(false) {
                down.push(id);
            }
            // The release the peer reported at our last handshake with it.
            let version = ctx.node.router().and_then(|r| r.peer_version(id));
            nodes.push(json!({"id": id, "self": false, "up": up, "peer_addr": peer,
                              "version": version, "last_ack_ms": last_ack_ms}));
        }
    }
    let mut summary = status::summary(me, &groups, &down);
    if !placement.moves.is_empty() {
        summary.push_str(&format!(
            "; {} replica moves in progress",
            placement.moves.len()
        ));
    }
    json!({
        "node": {
            "id": me,
            "version": env!("CARGO_PKG_VERSION"),
            "clients_addr": ctx.clients_addr.get().map(|a| a.to_string()),
            "http_addr": ctx.http_addr.to_string(),
            "uptime_s": ctx.started.elapsed().as_secs(),
            "io_backend": format!("{:?}", stats.backend),
            "disk_bytes": stats.segment_bytes,
            "data_dir_bytes": disk.data_dir_bytes,
            "disk_free_bytes": disk.free_bytes,
            "data_dir_complete": disk.complete,
            "client_connections": ctx.clients.connections_open(),
            // Upper bucket bounds in seconds (null before the first observation).
            "append_latency_p99_s": status::p99_json(&stats.append_latency),
            "sync_latency_p99_s": status::p99_json(&stats.sync_latency),
        },
        "nodes": nodes,
        // Issue 9: what recovery cut as damaged at start, and votes refused since while
        // a replica repaired (`chatlog_raft::repair`).
        "storage_damage": ctx.node.engine().damage().map(|d| d.to_string()),
        "votes_refused_while_repairing": chatlog_raft::repair::votes_refused(),
        // Issue 9 (session 7): vote-unknown replicas that finished their probe
        // (`chatlog_raft::vote_probe`) since start.
        "vote_probes_finished": chatlog_raft::vote_probe::probes_finished(),
        "groups": groups.iter().map(GroupView::to_json).collect::<Vec<_>>(),
        "summary": summary,
        "placement": cluster::placement_json(&placement),
    })
}

async fn admin_status(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&ctx, peer, &headers) {
        return r;
    }
    bounded(HANDLER_TIMEOUT, async move {
        axum::Json(status_json(&ctx).await).into_response()
    })
    .await
}

// ---- status page (page.rs) ----
async fn status_page(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = page::authorize(&ctx, peer, &headers) {
        return r;
    }
    bounded(HANDLER_TIMEOUT, async move {
        page::response(&status_json(&ctx).await)
    })
    .await
}
// ---- end status page ----

/// Reads `{"group": G, "to": N}`.
#[allow(clippy::result_large_err)]
fn transfer_request(body: &[u8]) -> Result<(u64, u64), Response> {
    let bad = |m: &str| {
        error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("{m}; expected {{\"group\": G, \"to\": N}}"),
        )
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let field = |name: &str| {
        v.get(name).and_then(Value::as_u64).ok_or_else(|| {
            bad(&format!(
                "\"{name}\" is missing or not a non-negative integer"
            ))
        })
    };
    Ok((field("group")?, field("to")?))
}

// ---- secret chats: forced erasure from disk (compact.rs) ----
async fn admin_compact(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&ctx, peer, &headers) {
        return r;
    }
    bounded(
        compact::ERASERS_WAIT + compact::COMPACT_WAIT + HANDLER_TIMEOUT,
        compact::compact(ctx),
    )
    .await
}
// ---- end secret chats ----

async fn leader_transfer(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&ctx, peer, &headers) {
        return r;
    }
    let (g, to) = match transfer_request(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    bounded(HANDLER_TIMEOUT + TRANSFER_WAIT, transfer(ctx, g, to)).await
}

async fn transfer(ctx: Ctx, g: u64, to: NodeId) -> Response {
    let me = ctx.node.node_id();
    let Some(group) = ctx.node.group(g) else {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("group {g} has no replica on node {me}"),
        );
    };
    let before = GroupView::of(&group, &ctx.changes);
    if before.leader == Some(to) {
        return axum::Json(json!({"group": g, "previous_leader": to, "leader": to,
                                 "term": before.term, "moved": false}))
        .into_response();
    }
    // Leadership first: only the leader's view of the voters is current (a follower that
    // knows the leader may not have the membership entry yet, and would call every node
    // a non-voter).
    if before.role != "leader" {
        return json_error(
            StatusCode::CONFLICT,
            json!({"code": "NOT_LEADER",
                   "error": match before.leader {
                       Some(l) => format!("node {me} does not lead group {g}; node {l} does: ask its HTTP port"),
                       None => format!("group {g} has no leader now; retry after the election"),
                   },
                   "leader": before.leader}),
        );
    }
    if !before.replicas.contains(&to) {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!(
                "node {to} is not a voter of group {g} (voters: {:?})",
                before.replicas
            ),
        );
    }
    if let Err(e) = group.raft().trigger().transfer_leader(to).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("group {g} stopped: {e}"),
        );
    }
    tracing::info!(group = g, from = me, to, "leader transfer requested");
    let waited = group
        .raft()
        .wait(Some(TRANSFER_WAIT))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != me),
            "a new leader",
        )
        .await;
    let after = GroupView::of(&group, &ctx.changes);
    match waited {
        Ok(_) => axum::Json(
            json!({"group": g, "previous_leader": me, "leader": after.leader,
                                   "term": after.term, "moved": after.leader == Some(to)}),
        )
        .into_response(),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            format!(
                "group {g} still led by node {me} after {TRANSFER_WAIT:?} (is node {to} up and caught up?)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_body_is_checked() {
        assert_eq!(
            transfer_request(br#"{"group": 3, "to": 2}"#).ok(),
            Some((3, 2))
        );
        for bad in [
            &b"nope"[..],
            br#"{"group": 3}"#,
            br#"{"group": -1, "to": 2}"#,
        ] {
            let r = transfer_request(bad).expect_err("refused");
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secres"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
