//! The backup endpoints of the node's HTTP port (admin token or loopback, like every
//! `/admin/…` route).
//!
//! What it owns: answering what this node can back up (`GET /admin/backup`), streaming
//! one group's consistent copy (`GET /admin/backup/group/{g}`, the group file of
//! `backup/mod.rs`) and one finished media file (`GET /admin/backup/media/{sha256 hex}`).
//! What it must not do: write anything, or hold more than [`STREAM_CHUNK_BYTES_MAX`] ×
//! [`STREAM_CHUNKS_IN_FLIGHT_MAX`] bytes of a stream (plus the group's checkpoint, the
//! encoding of state the node holds in memory anyway).
//!
//! A group's copy: the durable checkpoint is read first (applied index S), then a read
//! barrier (linearizable: answered by the group's leader, forwarded from a follower),
//! then the index A this replica has applied after it; S ≤ A because checkpoints are
//! only written at applied indexes. The log entries `first..=A` are then streamed from
//! the engine; every read is CRC-checked by the engine and each entry's index checked on
//! decode. An entry not yet durable on this replica (a follower applies what a majority
//! made durable) is waited for, boundedly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chatlog_raft::node::ProposeError;
use chatlog_raft::{codec, ids};
use serde_json::json;

use super::{
    STREAM_CHUNK_BYTES_MAX, STREAM_CHUNKS_IN_FLIGHT_MAX, encode_header, encode_trailer,
    is_media_name, put_entry,
};
use crate::http::HttpContext;

type Ctx = Arc<HttpContext>;

/// Longest a stream waits for an entry at or below the applied index to become durable on
/// this replica. Why: a follower applies entries a majority made durable, its own
/// fdatasync follows within one group commit; seconds mean the disk is failing.
pub const ENTRY_DURABLE_WAIT: Duration = Duration::from_secs(10);
/// Longest the read barrier before a group's copy may take. Why: it is one round trip to
/// the group's leader; beyond this the group has no leader and the backup says so.
pub const BARRIER_WAIT: Duration = Duration::from_secs(10);

/// The backup routes, merged into `crate::http::router`.
pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/admin/backup", get(inventory))
        .route("/admin/backup/group/{group}", get(group_stream))
        .route("/admin/backup/media/{id}", get(media_stream))
        .route("/admin/snapshot", axum::routing::post(snapshot))
}

/// Longest `POST /admin/snapshot` waits for every local group's checkpoint. Why: each is
/// one encode of the group's state and one engine write; a minute covers thousands of
/// groups on a slow disk, and the caller can ask again.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// `POST /admin/snapshot`: makes every local replica write a durable checkpoint of its
/// state at its applied index (openraft's `trigger().snapshot()`, which the state machine
/// turns into a checkpoint) and waits for each. Answers `{"node": N, "groups": [{"id": G,
/// "applied": N, "checkpoint": N|null}], "done": BOOL}`. A restart then re-applies only
/// what arrived since, and a backup copies state from there.
async fn snapshot(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    use openraft::async_runtime::WatchReceiver;
    if let Err(r) = crate::http::authorize(&ctx, peer, &headers) {
        return r;
    }
    let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
    let mut asked = Vec::new();
    for g in ctx.node.groups() {
        let applied = *g.shared().applied().borrow();
        if let Err(e) = g.raft().trigger().snapshot().await {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("group {}: {e}", g.id()),
            );
        }
        asked.push((g, applied));
    }
    let mut rows = Vec::new();
    let mut done = true;
    for (g, applied) in asked {
        let mut rx = g.raft().metrics();
        let reached = tokio::time::timeout_at(deadline, async {
            loop {
                let at = rx.borrow_watched().snapshot.map(|l| l.index);
                if at.is_some_and(|i| i >= applied) || applied == 0 {
                    return at;
                }
                if rx.changed().await.is_err() {
                    return at;
                }
            }
        })
        .await;
        let at = match reached {
            Ok(at) => at,
            Err(_) => {
                done = false;
                rx.borrow_watched().snapshot.map(|l| l.index)
            }
        };
        rows.push(json!({"id": g.id(), "applied": applied, "checkpoint": at}));
    }
    axum::Json(json!({"node": ctx.node.node_id(), "groups": rows, "done": done})).into_response()
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"code": code, "error": message.into()})),
    )
        .into_response()
}

fn media_files_dir(ctx: &HttpContext) -> std::path::PathBuf {
    ctx.node.config().data_dir.join("media").join("files")
}

/// `GET /admin/backup`: `{"node": N, "cluster_id": N, "groups": [{"id": G, "applied": N}],
/// "media": [{"id": "hex", "bytes": N}]}` — the groups this node holds a replica of and
/// its finished media files.
async fn inventory(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = crate::http::authorize(&ctx, peer, &headers) {
        return r;
    }
    let groups: Vec<_> = ctx
        .node
        .groups()
        .iter()
        .map(|g| json!({"id": g.id(), "applied": *g.shared().applied().borrow()}))
        .collect();
    let dir = media_files_dir(&ctx);
    let media = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if is_media_name(&name) {
                out.push(json!({"id": name, "bytes": e.metadata()?.len()}));
            }
        }
        Ok(out)
    })
    .await;
    match media {
        Ok(Ok(media)) => axum::Json(json!({
            "node": ctx.node.node_id(),
            "cluster_id": ctx.cluster_id,
            "groups": groups,
            "media": media,
        }))
        .into_response(),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            format!("listing media files: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string()),
    }
}

/// `GET /admin/backup/group/{g}`: the group file, streamed.
async fn group_stream(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(group): Path<u64>,
) -> Response {
    if let Err(r) = crate::http::authorize(&ctx, peer, &headers) {
        return r;
    }
    let Some(g) = ctx.node.group(group) else {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!(
                "node {} holds no replica of group {group} (its replicas: {:?})",
                ctx.node.node_id(),
                ctx.node.replicas_of(group)
            ),
        );
    };
    let engine = Arc::clone(ctx.node.engine());
    // 1. The durable checkpoint (S), before the barrier, so S <= A.
    let checkpoint = {
        let engine = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || {
            chatlog_raft::state_machine::read_checkpoint(&engine, group)
        })
        .await
    };
    let checkpoint = match checkpoint {
        Ok(Ok(c)) => c.unwrap_or_default(),
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "STORAGE",
                format!("reading the checkpoint of group {group}: {e}"),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string()),
    };
    let checkpoint_index = if checkpoint.is_empty() {
        None
    } else {
        match chatlog_raft::state_machine::checkpoint_header(&checkpoint) {
            Ok((applied, _)) => Some(applied.map_or(0, |l| l.index)),
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "STORAGE",
                    format!("the checkpoint of group {group}: {e}"),
                );
            }
        }
    };
    // 2. The read barrier, then A.
    match tokio::time::timeout(BARRIER_WAIT, ctx.node.read_barrier(group)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let code = match e {
                ProposeError::NotLeader { .. } => "NOT_LEADER",
                _ => "UNAVAILABLE",
            };
            return error(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string());
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "TIMEOUT",
                format!("group {group}: no read barrier within {BARRIER_WAIT:?}"),
            );
        }
    }
    let last = *g.shared().applied().borrow();
    let log = ids::raft_log(group).expect("a running group's id fits");
    let Some(bounds) = engine.bounds(log) else {
        return error(
            StatusCode::CONFLICT,
            "EMPTY",
            format!("group {group} holds no log here yet"),
        );
    };
    let purged = engine.meta(log, ids::META_PURGED).map(|b| b.to_vec());
    // The purge mark goes into the backup as is: it must decode.
    if let Some(Err(e)) = purged.as_deref().map(codec::decode_log_id) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "STORAGE",
            format!("group {group}: the purge mark: {e}"),
        );
    }
    // Every entry the engine holds, including the committed history retention keeps
    // below the purge mark (raft `log_store`, "Retention"): a restored node then serves
    // the same history (its log store finds it below the restored purge mark).
    let first = ids::raft_index(bounds.first.max(1));
    // The log must reach back to the checkpoint: entries (S, A] are re-applied on restore.
    if first > checkpoint_index.map_or(0, |s| s + 1) || first > last {
        return error(
            StatusCode::CONFLICT,
            "INCOMPLETE_LOG",
            format!(
                "group {group}: this replica's log starts at {first}, after its checkpoint \
                 at {checkpoint_index:?} (applied {last}); back it up from another replica"
            ),
        );
    }
    let head = encode_header(
        group,
        first,
        last,
        purged.as_deref(),
        checkpoint.len() as u64,
    );
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(STREAM_CHUNKS_IN_FLIGHT_MAX);
    tracing::info!(
        group,
        first,
        last,
        ?checkpoint_index,
        "backup stream started"
    );
    tokio::spawn(async move {
        let mut chunk = head;
        if !checkpoint.is_empty() {
            let crc = crc32fast::hash(&checkpoint);
            chunk.extend_from_slice(&checkpoint);
            chunk.extend_from_slice(&crc.to_le_bytes());
        }
        drop(checkpoint);
        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
            return;
        }
        let mut next = first;
        let mut waited = Duration::ZERO;
        while next <= last {
            let engine = Arc::clone(&engine);
            let range = ids::engine_index(next)..ids::engine_index(last) + 1;
            let read = tokio::task::spawn_blocking(move || {
                engine.read(log, range, STREAM_CHUNK_BYTES_MAX)
            })
            .await;
            let entries = match read {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Err(std::io::Error::other(format!(
                            "group {group}: reading entries from {next}: {e}"
                        ))))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            if entries.is_empty() {
                // Applied here but not durable here yet: wait for this replica's sync.
                if waited >= ENTRY_DURABLE_WAIT {
                    let _ = tx
                        .send(Err(std::io::Error::other(format!(
                            "group {group}: entry {next} did not become durable here \
                             within {ENTRY_DURABLE_WAIT:?}"
                        ))))
                        .await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                waited += Duration::from_millis(5);
                continue;
            }
            let mut out =
                Vec::with_capacity(entries.iter().map(|e| e.len() + 8).sum::<usize>() + 20);
            for bytes in entries {
                // Pair assertion: the entry carries the index it was read at.
                match codec::decode_entry(&bytes) {
                    Ok(e) if e.log_id.index == next => {}
                    Ok(e) => {
                        let _ = tx
                            .send(Err(std::io::Error::other(format!(
                                "group {group}: entry read at {next} says it is {}",
                                e.log_id
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(std::io::Error::other(format!(
                                "group {group}: entry {next}: {e}"
                            ))))
                            .await;
                        return;
                    }
                }
                put_entry(&mut out, &bytes);
                next += 1;
            }
            if next > last {
                out.extend_from_slice(&encode_trailer(last - first + 1));
            }
            if tx.send(Ok(Bytes::from(out))).await.is_err() {
                return;
            }
        }
        tracing::info!(group, first, last, "backup stream finished");
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `GET /admin/backup/media/{sha256 hex}`: a finished media file, byte for byte.
async fn media_stream(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = crate::http::authorize(&ctx, peer, &headers) {
        return r;
    }
    if !is_media_name(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "a media id is 64 lower-case hex digits",
        );
    }
    let path = media_files_dir(&ctx).join(&id);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!("node {} holds no media file {id}", ctx.node.node_id()),
            );
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "STORAGE",
                format!("opening media file {id}: {e}"),
            );
        }
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "STORAGE",
                format!("media file {id}: {e}"),
            );
        }
    };
    // Finished files are immutable (renamed into place whole), so the bytes read are the
    // bytes the length describes; the backup checks header CRC and content SHA-256.
    let stream = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = vec![0u8; STREAM_CHUNK_BYTES_MAX];
            let r = file.read(&mut buf).map(|n| {
                buf.truncate(n);
                buf
            });
            (r, file)
        })
        .await;
        match read {
            Ok((Ok(buf), _)) if buf.is_empty() => None,
            Ok((Ok(buf), file)) => Some((Ok(Bytes::from(buf)), Some(file))),
            Ok((Err(e), _)) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
