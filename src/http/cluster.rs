//! The admin API's cluster changes: node add and remove, replica moves, group add,
//! rebalance, and the placement as JSON (for `status` and for a node joining with
//! `chatlog serve --join`).
//!
//! What it owns: checking a request against the placement and the peers' liveness
//! (refusing what would break a group's majority or target a node that is down or
//! unknown, with a clear error), proposing the change to the controller group 0 through
//! `Node::propose` (any node forwards to group 0's leader), and waiting, when asked, until
//! the placement applied here shows the change done. What it must not do: carry out a
//! change itself; `chatlog_raft::controller` does, on the nodes that lead the groups, so a
//! change survives this request (and this node) going away.
//!
//! Endpoints (JSON bodies; errors as in `http/mod.rs`, plus `CONFLICT` with 409):
//! - `GET /admin/cluster`: `{"cluster_id": N, "node": N, "placement": {…}}`.
//! - `POST /admin/node-add` `{"node": N, "addr": "HOST:PORT"}`.
//! - `POST /admin/node-remove` `{"node": N, "wait": BOOL}`.
//! - `POST /admin/replica-move` `{"group": G, "from": N, "to": N, "wait": BOOL}`.
//! - `POST /admin/group-add` `{"count": K}`.
//! - `POST /admin/rebalance` `{"moves_max": N, "wait": BOOL}`: replica moves from the
//!   most to the least loaded nodes, then leader transfers (as many at most) toward an
//!   even count of leaders per node over the groups this node hosts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chatlog_raft::chat::placement::{Placement, PlacementCommand};
use chatlog_raft::chat::{Command, Outcome, RefusalCode};
use chatlog_raft::controller;
use chatlog_raft::{GroupId, NodeId};
use serde_json::{Value, json};

use super::{Ctx, HANDLER_TIMEOUT, authorize, bounded, error};

/// Longest a request with `"wait": true` waits for its change to complete. Why: a move
/// copies the group's log to the new replica (about a minute per few GiB here); past it
/// the caller gets `TIMEOUT` and the change carries on (`status` shows where it is).
pub const CHANGE_WAIT: Duration = Duration::from_secs(300);
/// How long a peer has to answer a liveness probe.
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// How often a waiting request looks at the placement again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Moves one `rebalance` starts at most, whatever it is asked (each copies a group).
pub const REBALANCE_MOVES_MAX: u64 = 64;

/// The placement as JSON.
pub fn placement_json(p: &Placement) -> Value {
    let load = p.load();
    json!({
        "version": p.version,
        "bootstrapped": p.is_bootstrapped(),
        "replication": p.replication,
        "user_groups": p.user_groups,
        "chat_groups": p.chat_groups(),
        "members": p.members.iter().map(|(n, m)| json!({
            "id": n, "addr": m.addr, "draining": m.draining,
            "replicas": load.get(n).copied().unwrap_or(0),
        })).collect::<Vec<_>>(),
        "groups": p.groups.iter().map(|(g, gp)| json!({
            "id": g, "replicas": gp.replicas, "epoch": gp.epoch,
        })).collect::<Vec<_>>(),
        "moves": p.moves.iter().map(|(g, m)| json!({
            "group": g, "from": m.from, "to": m.to, "step": m.step.name(),
        })).collect::<Vec<_>>(),
        "leader_transfers": p.leader_transfers.iter().map(|(g, n)| json!({
            "group": g, "to": n,
        })).collect::<Vec<_>>(),
    })
}

fn conflict(message: impl Into<String>) -> Response {
    error(StatusCode::CONFLICT, "CONFLICT", message)
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
}

fn not_found(message: impl Into<String>) -> Response {
    error(StatusCode::NOT_FOUND, "NOT_FOUND", message)
}

/// Parses a JSON body; `fields` are required non-negative integers.
#[allow(clippy::result_large_err)]
fn body(bytes: &[u8], fields: &[&str], shape: &str) -> Result<(Value, Vec<u64>), Response> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("not JSON: {e}; expected {shape}")))?;
    let mut out = Vec::new();
    for f in fields {
        out.push(v.get(*f).and_then(Value::as_u64).ok_or_else(|| {
            bad(format!(
                "\"{f}\" is missing or not a non-negative integer; expected {shape}"
            ))
        })?);
    }
    Ok((v, out))
}

fn wants_wait(v: &Value) -> bool {
    v.get("wait").and_then(Value::as_bool).unwrap_or(false)
}

/// Proposes a placement change; the outcome as a response on refusal or failure.
#[allow(clippy::result_large_err)]
async fn propose(ctx: &Ctx, cmd: PlacementCommand) -> Result<(u64, bool), Response> {
    match ctx.node.propose(0, Command::Placement(cmd)).await {
        Ok(Outcome::Placement { version, changed }) => Ok((version, changed)),
        Ok(Outcome::Refused(r)) => Err(match r.code {
            RefusalCode::NotFound => not_found(r.message),
            RefusalCode::Conflict => conflict(r.message),
            _ => bad(r.message),
        }),
        Ok(other) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            format!("unexpected outcome {other:?}"),
        )),
        Err(e) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("the controller group could not take the change: {e}"),
        )),
    }
}

/// The placement as group 0 applied it on this node.
fn placement(ctx: &Ctx) -> Placement {
    ctx.node
        .group(0)
        .map(|g| g.shared().read().placement().clone())
        .unwrap_or_default()
}

/// Waits until `done(placement)` holds, at most [`CHANGE_WAIT`].
async fn wait_until(ctx: &Ctx, done: impl Fn(&Placement) -> bool) -> Result<Placement, Placement> {
    let deadline = Instant::now() + CHANGE_WAIT;
    loop {
        let p = placement(ctx);
        if done(&p) {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            return Err(p);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn still_going(what: String, p: &Placement) -> Response {
    let mut v = json!({"code": "TIMEOUT",
        "error": format!("{what} is still in progress after {CHANGE_WAIT:?}; it carries on \
                          (see `admin status`)")});
    v["placement"] = placement_json(p);
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(v)).into_response()
}

macro_rules! admin {
    ($ctx:ident, $peer:ident, $headers:ident) => {
        if let Err(r) = authorize(&$ctx, $peer, &$headers) {
            return r;
        }
    };
}

pub(super) async fn cluster(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    admin!(ctx, peer, headers);
    let p = ctx.node.placement();
    axum::Json(json!({
        "cluster_id": ctx.cluster_id,
        "node": ctx.node.node_id(),
        "placement": placement_json(&p),
    }))
    .into_response()
}

pub(super) async fn node_add(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    admin!(ctx, peer, headers);
    let shape = r#"{"node": N, "addr": "HOST:PORT"}"#;
    let (v, f) = match body(&bytes, &["node"], shape) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let node = f[0];
    let Some(addr) = v.get("addr").and_then(Value::as_str) else {
        return bad(format!("\"addr\" is missing; expected {shape}"));
    };
    if addr.parse::<SocketAddr>().is_err() {
        return bad(format!(
            "\"addr\" {addr:?} is not HOST:PORT (an IP address and port)"
        ));
    }
    bounded(HANDLER_TIMEOUT, async move {
        match propose(
            &ctx,
            PlacementCommand::NodeAdd {
                node,
                addr: addr.to_owned(),
            },
        )
        .await
        {
            Ok((version, changed)) => axum::Json(json!({"node": node, "addr": addr,
                "added": changed, "version": version}))
            .into_response(),
            Err(r) => r,
        }
    })
    .await
}

/// The voters that answer among `voters`.
async fn live(ctx: &Ctx, voters: &[NodeId]) -> Vec<NodeId> {
    let mut up = Vec::new();
    for v in voters {
        if ctx.node.peer_answers(*v, PROBE_WAIT).await {
            up.push(*v);
        }
    }
    up
}

pub(super) async fn replica_move(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    admin!(ctx, peer, headers);
    let shape = r#"{"group": G, "from": N, "to": N, "wait": BOOL}"#;
    let (v, f) = match body(&bytes, &["group", "from", "to"], shape) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (g, from, to) = (f[0], f[1], f[2]);
    let wait = wants_wait(&v);
    bounded(HANDLER_TIMEOUT + CHANGE_WAIT, async move {
        let p = placement(&ctx);
        if !p.is_bootstrapped() {
            return conflict("the placement is not bootstrapped yet; retry in a moment");
        }
        let Some(gp) = p.groups.get(&g) else {
            return not_found(format!("no group {g}"));
        };
        let resuming = p
            .moves
            .get(&g)
            .is_some_and(|m| m.from == from && m.to == to);
        if !resuming {
            if !p.members.contains_key(&to) {
                return not_found(format!(
                    "node {to} is not a member of the cluster (start it with `serve --join` \
                     or add it with `admin node add`)"
                ));
            }
            if !gp.replicas.contains(&from) {
                return bad(format!(
                    "node {from} holds no replica of group {g} (replicas: {:?})",
                    gp.replicas
                ));
            }
            if !ctx.node.peer_answers(to, PROBE_WAIT).await {
                return conflict(format!(
                    "node {to} does not answer on its peer port: it is down"
                ));
            }
            let after: Vec<NodeId> = gp
                .replicas
                .iter()
                .map(|r| if *r == from { to } else { *r })
                .collect();
            let up = live(&ctx, &after).await;
            let majority = after.len() / 2 + 1;
            if up.len() < majority {
                return conflict(format!(
                    "moving group {g} from node {from} to node {to} would break its majority: \
                     only nodes {up:?} of {after:?} answer"
                ));
            }
        }
        if let Err(r) = propose(&ctx, PlacementCommand::MoveStart { group: g, from, to }).await {
            return r;
        }
        let started = Instant::now();
        if !wait {
            return axum::Json(json!({"group": g, "from": from, "to": to, "done": false,
                "placement": placement_json(&placement(&ctx))}))
            .into_response();
        }
        match wait_until(&ctx, |p| {
            !p.moves.contains_key(&g)
                && p.replicas(g).contains(&to)
                && !p.replicas(g).contains(&from)
        })
        .await
        {
            Ok(p) => axum::Json(json!({"group": g, "from": from, "to": to, "done": true,
                "replicas": p.replicas(g), "elapsed_ms": started.elapsed().as_millis() as u64}))
            .into_response(),
            Err(p) => still_going(format!("the move of group {g}"), &p),
        }
    })
    .await
}

pub(super) async fn node_remove(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    admin!(ctx, peer, headers);
    let shape = r#"{"node": N, "wait": BOOL}"#;
    let (v, f) = match body(&bytes, &["node"], shape) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let node = f[0];
    let wait = wants_wait(&v);
    bounded(HANDLER_TIMEOUT + CHANGE_WAIT, async move {
        let p = placement(&ctx);
        let Some(m) = p.members.get(&node) else {
            return not_found(format!("node {node} is not a member of the cluster"));
        };
        if !m.draining {
            let staying = p
                .members
                .iter()
                .filter(|(n, m)| **n != node && !m.draining)
                .count() as u64;
            if staying < p.replication {
                return conflict(format!(
                    "removing node {node} would leave {staying} nodes for groups of {} \
                     replicas: its groups would lose a replica and their majority would hang \
                     on one more failure; add a node first",
                    p.replication
                ));
            }
            for (g, gp) in &p.groups {
                if !gp.replicas.contains(&node) {
                    continue;
                }
                let others: Vec<NodeId> =
                    gp.replicas.iter().copied().filter(|r| *r != node).collect();
                let up = live(&ctx, &others).await;
                let majority = gp.replicas.len() / 2 + 1;
                // The drain moves this replica to a live node: others up + 1 must be a majority.
                if up.len() + 1 < majority {
                    return conflict(format!(
                        "removing node {node} would break the majority of group {g}: only \
                         nodes {up:?} of its other replicas {others:?} answer"
                    ));
                }
                if controller::move_target(&ctx.node, &p, *g, node)
                    .await
                    .is_none()
                {
                    return conflict(format!(
                        "no live member can take node {node}'s replica of group {g}"
                    ));
                }
            }
        }
        if let Err(r) = propose(&ctx, PlacementCommand::NodeDrain { node }).await {
            return r;
        }
        let started = Instant::now();
        if !wait {
            return axum::Json(json!({"node": node, "draining": true, "removed": false}))
                .into_response();
        }
        match wait_until(&ctx, |p| !p.members.contains_key(&node)).await {
            Ok(_) => axum::Json(json!({"node": node, "draining": false, "removed": true,
                "elapsed_ms": started.elapsed().as_millis() as u64}))
            .into_response(),
            Err(p) => still_going(format!("the removal of node {node}"), &p),
        }
    })
    .await
}

pub(super) async fn group_add(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    admin!(ctx, peer, headers);
    let (_, f) = match body(&bytes, &["count"], r#"{"count": K}"#) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let count = f[0];
    bounded(HANDLER_TIMEOUT, async move {
        let before: Vec<GroupId> = placement(&ctx).groups.keys().copied().collect();
        if let Err(r) = propose(&ctx, PlacementCommand::GroupsAdd { count }).await {
            return r;
        }
        // The proposal returned once this node applied it.
        let p = placement(&ctx);
        let added: Vec<Value> = p
            .groups
            .iter()
            .filter(|(g, _)| !before.contains(g))
            .map(|(g, gp)| json!({"id": g, "replicas": gp.replicas}))
            .collect();
        axum::Json(json!({"added": added, "chat_groups": p.chat_groups()})).into_response()
    })
    .await
}

pub(super) async fn rebalance(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    admin!(ctx, peer, headers);
    let (v, f) = match body(&bytes, &["moves_max"], r#"{"moves_max": N, "wait": BOOL}"#) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let moves_max = f[0].min(REBALANCE_MOVES_MAX) as usize;
    let wait = wants_wait(&v);
    bounded(HANDLER_TIMEOUT + CHANGE_WAIT, async move {
        let p = placement(&ctx);
        let plan = controller::rebalance_plan(&ctx.node, &p, moves_max).await;
        let mut started = Vec::new();
        for (g, from, to) in &plan {
            match propose(
                &ctx,
                PlacementCommand::MoveStart {
                    group: *g,
                    from: *from,
                    to: *to,
                },
            )
            .await
            {
                Ok(_) => started.push(json!({"group": g, "from": from, "to": to})),
                Err(r) => return r,
            }
        }
        // Then leaders, over the groups this node hosts (it knows their leaders).
        let mut leaders = Vec::new();
        for (g, to) in controller::leader_plan(&ctx.node, &p, moves_max) {
            match propose(&ctx, PlacementCommand::LeaderWant { group: g, to }).await {
                Ok(_) => leaders.push(json!({"group": g, "to": to})),
                Err(r) => return r,
            }
        }
        if wait {
            let groups: Vec<GroupId> = plan.iter().map(|(g, _, _)| *g).collect();
            if let Err(p) =
                wait_until(&ctx, |p| groups.iter().all(|g| !p.moves.contains_key(g))).await
            {
                return still_going("the rebalance".into(), &p);
            }
        }
        axum::Json(json!({"moves": started, "leader_transfers": leaders, "done": wait}))
            .into_response()
    })
    .await
}
