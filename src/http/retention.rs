//! The retention policy on the admin API (session 8): `GET /admin/retention` (each local
//! replica's replicated policy, horizon and a digest of its applied state) and
//! `POST /admin/retention` (sets the policy of every group, cluster-wide, while serving).
//!
//! What it owns: the JSON of a policy, the two routes, and the state digest replicas are
//! compared by. What it must not do: set a policy any other way than by proposing
//! `Command::Retention` to each group (the policy is replicated state,
//! `chatlog_raft::chat::retention`), or hold a group's state lock longer than one encode.
//!
//! - `GET /admin/retention`: `{"node": N, "groups": [{"id": G, "policy": POLICY|null,
//!   "retained_from": N, "applied": N, "state_digest": "16 hex digits"}, …]}` where POLICY
//!   is `{"entries": N|null, "bytes": N|null}` and `null` means none was ever set (keep
//!   everything). The digest is FNV-1a 64 over the group's encoded applied state at
//!   `applied` (the checkpoint encoding): replicas at the same `applied` agree on it. It
//!   encodes the whole state, so it costs what a full checkpoint encode costs: a check
//!   for operators and tests, not for a status page that reloads.
//! - `POST /admin/retention` with `{"entries": N|null, "bytes": N|null}` (both absent or
//!   null: keep everything): proposes the policy to every group of the placement through
//!   its leader and answers `{"policy": POLICY, "groups": [{"id": G, "changed": BOOL}, …]}`;
//!   400 `BAD_REQUEST` for a limit of 0 or a malformed body, 503 `UNAVAILABLE` naming the
//!   first group that could not take it (the others may have: repeat the call, it is
//!   idempotent). The groups are asked at once; each answer waits until its group applied.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chatlog_raft::chat::retention::{RetentionCommand, RetentionPolicy};
use chatlog_raft::chat::{Command, Outcome};
use serde_json::{Value, json};
use std::net::SocketAddr;

use super::{Ctx, HANDLER_TIMEOUT, authorize, bounded, error};

/// The routes (merged into `crate::http::router`).
pub fn routes() -> Router<Ctx> {
    Router::new().route("/admin/retention", get(show).post(set))
}

/// A policy as JSON; `None` (never set) is null.
pub fn policy_json(p: Option<RetentionPolicy>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => json!({"entries": p.retain_entries, "bytes": p.retain_bytes}),
    }
}

/// FNV-1a 64 of `bytes`, as 16 hex digits.
pub fn digest(bytes: &[u8]) -> String {
    format!("{:016x}", chatlog_raft::codec::fnv1a(bytes))
}

async fn show(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&ctx, peer, &headers) {
        return r;
    }
    bounded(HANDLER_TIMEOUT, async move {
        let groups: Vec<Value> = ctx
            .node
            .groups()
            .iter()
            .map(|g| {
                let shared = g.shared();
                // `applied` moves after apply releases the state, so it is read before
                // and after the encode: equal, it is the index the state is at.
                loop {
                    let before = *shared.applied().borrow();
                    let st = shared.read();
                    let bytes = st.encode();
                    let (policy, from) = (st.retention_policy(), st.retained_from());
                    drop(st);
                    if *shared.applied().borrow() == before {
                        break json!({"id": g.id(), "policy": policy_json(policy),
                                     "retained_from": from, "applied": before,
                                     "state_digest": digest(&bytes)});
                    }
                }
            })
            .collect();
        axum::Json(json!({"node": ctx.node.node_id(), "groups": groups})).into_response()
    })
    .await
}

/// Reads `{"entries": N|null, "bytes": N|null}`.
#[allow(clippy::result_large_err)]
fn policy_request(body: &[u8]) -> Result<RetentionPolicy, Response> {
    let bad = |m: String| {
        error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("{m}; expected {{\"entries\": N|null, \"bytes\": N|null}}"),
        )
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |name: &str| match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("\"{name}\" is not a non-negative integer"))),
    };
    let policy = RetentionPolicy {
        retain_entries: field("entries")?,
        retain_bytes: field("bytes")?,
    };
    if let Some(why) = policy.invalid() {
        return Err(bad(why.into()));
    }
    Ok(policy)
}

async fn set(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&ctx, peer, &headers) {
        return r;
    }
    let policy = match policy_request(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    bounded(HANDLER_TIMEOUT, async move {
        let groups: Vec<u64> = ctx.node.placement().groups.keys().copied().collect();
        let cmd = Command::Retention(RetentionCommand {
            policy,
            only_if_unset: false,
        });
        // Every group at once; answered in group order.
        let answers = futures_util::future::join_all(
            groups.iter().map(|g| ctx.node.propose(*g, cmd.clone())),
        )
        .await;
        let mut done = Vec::new();
        for (g, answer) in groups.into_iter().zip(answers) {
            match answer {
                Ok(Outcome::Retention { changed }) => {
                    done.push(json!({"id": g, "changed": changed}));
                }
                Ok(other) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!("group {g} answered {other:?}"),
                    );
                }
                Err(e) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!(
                            "group {g} could not take the policy: {e}; other groups may have \
                             taken it, repeat the call"
                        ),
                    );
                }
            }
        }
        tracing::info!(policy = %policy.describe(), "retention policy set on every group");
        axum::Json(json!({"policy": policy_json(Some(policy)), "groups": done})).into_response()
    })
    .await
}
