//! `chatlog admin retention show|set` (session 8): the replicated retention policy of
//! every group, against a node's HTTP port (`crate::http::retention`).
//!
//! What it owns: the flags and help of the two commands and printing their answers.
//! What it must not do: set a policy any other way than through `POST /admin/retention`
//! (which proposes it to every group).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::admin_cmd::{AdminConn, call, opt, print_or_json};
use crate::cli::CliError;

/// Bound of one call (the server answers within 5 s or says it timed out).
const RETENTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `chatlog admin retention …`.
#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Each group replica on the node: its replicated retention policy ("none": never set,
    /// the group keeps everything), the first Raft index its history keeps, its applied
    /// index and a digest of its applied state (replicas at the same applied index have
    /// the same digest).
    ///
    /// --json: {"node": N, "groups": [{"id": G, "policy": {"entries": N|null, "bytes":
    /// N|null}|null, "retained_from": N, "applied": N, "state_digest": "…"}, …]}
    Show(ShowArgs),
    /// Sets the retention policy of every group of the cluster while it serves (a
    /// replicated command: every replica trims under it from the same log entry on).
    /// Keep about the newest --entries N Raft entries of each group and/or the newest
    /// entries whose bytes sum to at least --bytes B; neither (or --keep-all): keep
    /// everything from now on. History already dropped does not come back. This replaces
    /// the policy `chatlog serve --retain-entries/--retain-bytes` seeded; those flags
    /// only seed a group that has no policy yet.
    ///
    /// --json: {"policy": {"entries": N|null, "bytes": N|null}, "groups": [{"id": G,
    /// "changed": BOOL}, …]}
    Set(SetArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub conn: AdminConn,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// Keep about the newest N Raft entries of each group (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub entries: Option<u64>,
    /// Keep the newest entries of each group whose bytes sum to at least B (at least 1).
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u64).range(1..))]
    pub bytes: Option<u64>,
    /// Keep everything (no limit); the same as giving neither limit, said explicitly.
    #[arg(long, conflicts_with_all = ["entries", "bytes"])]
    pub keep_all: bool,
}

/// A policy's JSON for people (also `admin status`).
pub(crate) fn describe(p: &Value) -> String {
    if p.is_null() {
        return "none (keep everything)".into();
    }
    match (p["entries"].as_u64(), p["bytes"].as_u64()) {
        (None, None) => "keep everything".into(),
        (e, b) => [
            e.map(|e| format!("entries={e}")),
            b.map(|b| format!("bytes={b}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" "),
    }
}

/// Runs one `admin retention` command.
pub async fn run(c: RetentionCommand) -> Result<(), CliError> {
    match c {
        RetentionCommand::Show(a) => {
            let v = call(&a.conn, "GET", "/admin/retention", None, RETENTION_TIMEOUT).await?;
            let mut lines = vec![format!("node {}:", opt(&v["node"]))];
            for g in v["groups"].as_array().into_iter().flatten() {
                lines.push(format!(
                    "group {}: policy {}, retained from index {}, applied {}, state {}",
                    opt(&g["id"]),
                    describe(&g["policy"]),
                    opt(&g["retained_from"]),
                    opt(&g["applied"]),
                    g["state_digest"].as_str().unwrap_or("-")
                ));
            }
            print_or_json(&a.conn, &v, lines.join("\n"));
        }
        RetentionCommand::Set(a) => {
            let body = json!({"entries": a.entries, "bytes": a.bytes});
            let v = call(
                &a.conn,
                "POST",
                "/admin/retention",
                Some(body),
                RETENTION_TIMEOUT,
            )
            .await?;
            let groups = v["groups"].as_array().map_or(0, Vec::len);
            let changed = v["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["changed"].as_bool() == Some(true))
                .count();
            let line = format!(
                "retention {} on {groups} groups ({changed} changed)",
                describe(&v["policy"])
            );
            print_or_json(&a.conn, &v, line);
        }
    }
    Ok(())
}
