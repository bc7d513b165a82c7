//! `POST /admin/compact`: erase what was redacted from the disk now.
//!
//! What it owns: one operation for operators and tests: wait (bounded) until every local
//! group's secret-chat eraser has zeroed what the applied state erased, seal the active
//! segment so its bytes can be rewritten, and run a compaction pass
//! (`Engine::compact_now`), which rewrites every sealed segment holding redacted bytes and
//! frees the old files. Answers `{"segments_rewritten": N, "entries_rewritten": N,
//! "bytes_rewritten": N, "erasures_pending": false}`. What it must not do: change what
//! any log holds; it only moves live bytes and drops dead ones (the background compactor
//! does the same on its own schedule).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Ctx, error};

/// Longest `POST /admin/compact` waits for the erasers to catch up. Why: an eraser is a
/// group commit behind apply; seconds mean a stalled disk, and the answer then says
/// `"erasures_pending": true` rather than hanging.
pub const ERASERS_WAIT: Duration = Duration::from_secs(5);

/// Longest the compaction itself may take. Why: a pass is rate-limited
/// (`compaction_bytes_per_sec`, 32 MiB/s by default): this covers a few GiB rewritten.
pub const COMPACT_WAIT: Duration = Duration::from_secs(120);

pub(super) async fn compact(ctx: Ctx) -> Response {
    let started = tokio::time::Instant::now();
    let settled = || {
        ctx.node
            .groups()
            .iter()
            .all(|g| g.secret_erasures_settled())
    };
    while !settled() && started.elapsed() < ERASERS_WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let erasures_pending = !settled();
    let engine = std::sync::Arc::clone(ctx.node.engine());
    let work = tokio::task::spawn_blocking(move || {
        engine.rotate_blocking()?;
        engine.compact_now()
    });
    match tokio::time::timeout(COMPACT_WAIT, work).await {
        Ok(Ok(Ok(report))) => (
            StatusCode::OK,
            axum::Json(json!({
                "segments_rewritten": report.segments_rewritten,
                "entries_rewritten": report.entries_rewritten,
                "bytes_rewritten": report.bytes_rewritten,
                "erasures_pending": erasures_pending,
            })),
        )
            .into_response(),
        Ok(Ok(Err(e))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("compaction failed: {e}"),
        ),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            format!("compaction task: {e}"),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            format!("compaction still running after {COMPACT_WAIT:?}"),
        ),
    }
}
