//! `chatlog admin …`: operator commands against a node's HTTP port (`crate::http`).
//!
//! What it owns: the flags and help of `admin status`, `admin leader-transfer` and the
//! cluster changes (`node add|remove`, `replica move`, `group add`, `rebalance`), one
//! HTTP call each (`crate::http::client`), and printing the answer for people (a summary
//! line and a table) or, with `--json`, the server's JSON as it came. Errors print as
//! `error: CODE: message` (exit status 1), `CODE` being the server's error code or
//! `CONNECT_FAILED` / `PROTOCOL` for the client's own failures.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::cli::CliError;
use crate::http::client::{HttpResponse, request};

/// Default `--server` of admin commands: the default `--http` of `chatlog serve`.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7480";

/// Bound of one status call (the server answers within 5 s or says it timed out).
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one leader transfer (the server waits up to 10 s for the new leader).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags every admin command takes.
#[derive(Debug, Clone, Args)]
pub struct AdminConn {
    /// The node's HTTP address (what `chatlog serve` prints as `http: ADDR`).
    #[arg(long, value_name = "HTTP_ADDR", env = "CHATLOG_ADMIN_SERVER", default_value = DEFAULT_HTTP)]
    pub server: String,
    /// The node's admin token (its `--admin-token`); not needed on loopback when the node
    /// runs without one.
    #[arg(long, env = "CHATLOG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Print the server's JSON instead of lines for people.
    #[arg(long)]
    pub json: bool,
}

/// Operator commands (the node's HTTP port, not the client port).
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Groups of one node: leader, term, commit and applied index, follower lag, size on
    /// this node's disk (an estimate: the live share of the segment bytes of the group's
    /// Raft log and checkpoint logs); the nodes up or down; this node's disk (data
    /// directory, segment files, free bytes); and the cluster's placement (members,
    /// replicas per group, moves in progress). The same is on the status page at
    /// http://HTTP_ADDR/ .
    ///
    /// --json: {"node": {"id": N, "version": "…", "clients_addr": "…", "http_addr": "…",
    /// "disk_bytes": N, "data_dir_bytes": N, "disk_free_bytes": N|null,
    /// "data_dir_complete": BOOL, "append_latency_p99_s": S|"+Inf"|null,
    /// "sync_latency_p99_s": S|"+Inf"|null, …}, "nodes": [{"id": N, "self": BOOL, "up": BOOL|null,
    /// "peer_addr": "…"|null}, …],
    /// "groups": [{"id": G, "role": "leader"|"follower"|…, "leader": N|null, "term": N,
    /// "last_log_index": N|null, "committed": N|null, "applied": N|null, "replicas": [N, …],
    /// "learners": [N, …], "followers": [{"node": N, "matched": N|null, "lag": N,
    /// "last_ack_ms": N|null}, …], "fatal": "…"|null, "elections": N,
    /// "leader_changes": N, "disk_bytes": N, "commit_latency_p99_s": S|"+Inf"|null}, …], "summary": "…", "placement": {"version": N,
    /// "bootstrapped": BOOL, "replication": N, "user_groups": N, "chat_groups": N,
    /// "members": [{"id": N, "addr": "…", "draining": BOOL, "replicas": N}, …],
    /// "groups": [{"id": G, "replicas": [N, …], "epoch": N}, …], "moves": [{"group": G,
    /// "from": N, "to": N, "step": "learner"|"promote"}, …], "leader_transfers":
    /// [{"group": G, "to": N}, …]}}
    Status(StatusArgs),
    /// Moves a group's leadership to another of its replicas.
    ///
    /// Ask the node that leads the group (another answers NOT_LEADER naming the
    /// leader); the command waits up to 10 s for the new leader.
    ///
    /// --json: {"group": G, "previous_leader": N, "leader": N, "term": N, "moved": BOOL}
    LeaderTransfer(TransferArgs),
    // ---- cluster changes (`crate::http::cluster`) ----
    /// Adds or removes cluster members.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Moves group replicas between nodes.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Adds chat groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Evens out replicas per node (moves from the most loaded nodes to the least loaded
    /// ones) and then leaders (transfers toward an even count of leaders per node, over
    /// the groups the asked node hosts), at most --moves-max of each at a time (run it
    /// again for more).
    ///
    /// --json: {"moves": [{"group": G, "from": N, "to": N}, …], "leader_transfers":
    /// [{"group": G, "to": N}, …], "done": BOOL}
    Rebalance(RebalanceArgs),
    // ---- backup (`crate::backup`) ----
    /// Copies every group and media file of the running cluster into --out DIR.
    ///
    /// Each group's copy is its durable checkpoint plus its Raft log up to an index
    /// applied after a read barrier, so every write acknowledged before the group was
    /// reached is in it; media files are copied whole. Everything is streamed from the
    /// nodes' HTTP ports, each file checked and listed with its size and SHA-256 in
    /// DIR/manifest.json, written last. Writes continue meanwhile. Restore with
    /// `chatlog restore` (docs/operations.md, "Back up and restore").
    ///
    /// --json: {"out": "DIR", "groups": N, "media": N, "bytes": N, "elapsed_ms": N,
    /// "manifest": {…the manifest…}}
    Backup(crate::backup::cmd::BackupArgs),
    /// Makes every group replica on the node write a durable checkpoint now.
    ///
    /// A checkpoint is what a restart loads before re-applying the log after it, and
    /// where a backup's copy of a group starts. It copies nothing off the node: `backup`
    /// does that.
    ///
    /// --json: {"node": N, "groups": [{"id": G, "applied": N, "checkpoint": N|null}, …],
    /// "done": BOOL}
    Snapshot(StatusArgs),
    // ---- end backup ----
    // ---- retention policy (`crate::admin_retention`, s8retention) ----
    /// Shows or sets the replicated retention policy of every group.
    #[command(subcommand)]
    Retention(crate::admin_retention::RetentionCommand),
    // ---- end retention policy ----
}

/// `chatlog admin node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Registers a node (normally done by `chatlog serve --join`, which calls it itself).
    /// The node then follows the controller group 0 and can receive replicas.
    ///
    /// --json: {"node": N, "addr": "HOST:PORT", "added": BOOL, "version": N}
    Add(NodeAddArgs),
    /// Drains a node (moves each of its replicas to the least-loaded other node, one at
    /// a time) and then removes it. Refused when the remaining nodes are fewer than the
    /// replicas per group, or when a group would lose its majority (its other replicas
    /// down). Waits until the node is gone unless --no-wait.
    ///
    /// --json: {"node": N, "draining": BOOL, "removed": BOOL, "elapsed_ms": N}
    Remove(NodeRemoveArgs),
}

/// `chatlog admin replica …`.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Moves group G's replica from node A to node B: B is added as a learner and caught
    /// up, then promoted while A is removed; A deletes its copy. Every step is recorded in
    /// the controller group, shown by `status`, and resumed after a crash (run the same
    /// command again, or let the group's leader carry on). Refused when B is unknown or
    /// down or when the move would break the group's majority. Waits until done unless
    /// --no-wait.
    ///
    /// --json: {"group": G, "from": N, "to": N, "done": BOOL, "replicas": [N, …],
    /// "elapsed_ms": N}
    Move(MoveArgs),
}

/// `chatlog admin group …`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Adds K chat groups, each placed on the least-loaded nodes. New group and channel
    /// chats are spread over every group from then on; existing chats stay where they are.
    ///
    /// --json: {"added": [{"id": G, "replicas": [N, …]}, …], "chat_groups": N}
    Add(GroupAddArgs),
}

#[derive(Debug, Args)]
pub struct NodeAddArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// The new node's id.
    pub node: u64,
    /// Its peer address (HOST:PORT, what it passes as --peer-listen).
    #[arg(long)]
    pub addr: String,
}

#[derive(Debug, Args)]
pub struct NodeRemoveArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// The node to drain and remove.
    pub node: u64,
    /// Return once the drain started instead of waiting for it to finish.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// The group.
    #[arg(long)]
    pub group: u64,
    /// The node giving up its replica.
    #[arg(long)]
    pub from: u64,
    /// The node receiving it.
    #[arg(long)]
    pub to: u64,
    /// Return once the move started instead of waiting for it to finish.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct GroupAddArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// How many groups to add (1 to 256).
    #[arg(long)]
    pub count: u64,
}

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// Moves to start at most (each copies a group to another node).
    #[arg(long, default_value_t = 2)]
    pub moves_max: u64,
    /// Return once the moves started instead of waiting for them to finish.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: AdminConn,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// The group.
    #[arg(long)]
    pub group: u64,
    /// The node that should lead it (one of its replicas).
    #[arg(long)]
    pub to: u64,
}

/// An admin command's failure: `CODE: message`.
#[derive(Debug)]
struct AdminError {
    code: String,
    message: String,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for AdminError {}

fn fail(code: &str, message: impl Into<String>) -> CliError {
    Box::new(AdminError {
        code: code.into(),
        message: message.into(),
    })
}

/// Runs one admin command on its own single-threaded runtime.
pub fn run(cmd: AdminCommand) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd {
            AdminCommand::Status(a) => status(a).await,
            AdminCommand::LeaderTransfer(a) => leader_transfer(a).await,
            AdminCommand::Node(c) => node_command(c).await,
            AdminCommand::Replica(ReplicaCommand::Move(a)) => replica_move(a).await,
            AdminCommand::Group(GroupCommand::Add(a)) => group_add(a).await,
            AdminCommand::Rebalance(a) => rebalance(a).await,
            AdminCommand::Backup(a) => crate::backup::cmd::backup(a).await,
            AdminCommand::Snapshot(a) => crate::backup::cmd::snapshot(a.conn).await,
            AdminCommand::Retention(c) => crate::admin_retention::run(c).await,
        }
    })
}

/// Makes the call; a 2xx answer's JSON body, or the server's error as `CODE: message`.
pub(crate) async fn call(
    conn: &AdminConn,
    method: &str,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Result<Value, CliError> {
    let token = conn.admin_token.as_deref().filter(|t| !t.is_empty());
    let body = body.map(|b| b.to_string().into_bytes());
    let r: HttpResponse = request(&conn.server, method, path, token, body.as_deref(), timeout)
        .await
        .map_err(|e| fail("CONNECT_FAILED", e))?;
    let value: Option<Value> = serde_json::from_slice(&r.body).ok();
    if (200..300).contains(&r.status) {
        return value.ok_or_else(|| {
            fail(
                "PROTOCOL",
                format!("{} answered {} without JSON", conn.server, r.status),
            )
        });
    }
    let (code, message) = match &value {
        Some(v) => (
            v.get("code")
                .and_then(Value::as_str)
                .unwrap_or("HTTP_ERROR")
                .to_owned(),
            v.get("error")
                .and_then(Value::as_str)
                .map_or_else(|| v.to_string(), str::to_owned),
        ),
        None => ("HTTP_ERROR".to_owned(), r.text().trim().to_owned()),
    };
    Err(fail(&code, format!("{message} (HTTP {})", r.status)))
}

pub(crate) fn opt(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

async fn status(a: StatusArgs) -> Result<(), CliError> {
    let v = call(&a.conn, "GET", "/admin/status", None, STATUS_TIMEOUT).await?;
    if a.conn.json {
        println!("{v}");
        return Ok(());
    }
    print!("{}", render_status(&v));
    Ok(())
}

/// The human rendering: the summary line, then one row per group.
fn render_status(v: &Value) -> String {
    let mut out = String::new();
    out.push_str(v["summary"].as_str().unwrap_or("(no summary)"));
    out.push('\n');
    let rows: Vec<[String; 9]> = v["groups"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .map(|g| {
                    let replicas: Vec<String> = g["replicas"]
                        .as_array()
                        .map(|r| r.iter().map(opt).collect())
                        .unwrap_or_default();
                    let followers = g["followers"].as_array().cloned().unwrap_or_default();
                    let lag = if followers.is_empty() {
                        "-".to_owned()
                    } else {
                        followers
                            .iter()
                            .map(|f| format!("{}:{}", opt(&f["node"]), opt(&f["lag"])))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    [
                        opt(&g["id"]),
                        opt(&g["leader"]),
                        g["role"].as_str().unwrap_or("?").to_owned(),
                        opt(&g["term"]),
                        opt(&g["committed"]),
                        opt(&g["applied"]),
                        replicas.join(","),
                        lag,
                        g["disk_bytes"]
                            .as_u64()
                            .map_or_else(|| "-".to_owned(), crate::http::human_bytes),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let header = [
        "GROUP", "LEADER", "ROLE", "TERM", "COMMIT", "APPLIED", "REPLICAS", "LAG", "DISK",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    out.push_str(&line(header.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    // ---- ops status (issue 7): nodes up/down and this node's disk ----
    if let Some(nodes) = v["nodes"].as_array() {
        let list: Vec<String> = nodes
            .iter()
            .map(|n| {
                let state = match n["up"].as_bool() {
                    Some(true) => "up",
                    Some(false) => "DOWN",
                    None => "unknown",
                };
                let version = n["version"]
                    .as_str()
                    .map(|v| format!(" v{v}"))
                    .unwrap_or_default();
                format!("{} {state}{version}", opt(&n["id"]))
            })
            .collect();
        out.push_str(&format!("nodes: {}\n", list.join(", ")));
    }
    let node = &v["node"];
    if let Some(data) = node["data_dir_bytes"].as_u64() {
        out.push_str(&format!(
            "disk of node {}: data dir {}{}, segment files {}, free {}\n",
            opt(&node["id"]),
            crate::http::human_bytes(data),
            if node["data_dir_complete"].as_bool() == Some(false) {
                " (at least)"
            } else {
                ""
            },
            node["disk_bytes"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), crate::http::human_bytes),
            node["disk_free_bytes"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), crate::http::human_bytes),
        ));
    }
    // ---- end ops status ----
    // ---- retention policy (s8retention): groups by replicated policy ----
    let mut by_policy: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for g in v["groups"].as_array().into_iter().flatten() {
        let r = &g["retention"];
        if r.is_null() {
            continue;
        }
        by_policy
            .entry(crate::admin_retention::describe(&r["policy"]))
            .or_default()
            .push(opt(&g["id"]));
    }
    // Printed once some group has a policy (a cluster without retention prints as before).
    let none = crate::admin_retention::describe(&Value::Null);
    if by_policy.keys().any(|p| *p != none) {
        let parts: Vec<String> = by_policy
            .iter()
            .map(|(p, gs)| format!("{p} (groups {})", gs.join(",")))
            .collect();
        out.push_str(&format!("retention: {}\n", parts.join("; ")));
    }
    // ---- end retention policy ----
    // The cluster's placement (replicated in group 0): members and moves in progress.
    let p = &v["placement"];
    if let Some(members) = p["members"].as_array() {
        let list: Vec<String> = members
            .iter()
            .map(|m| {
                format!(
                    "{}@{} ({} replicas{})",
                    opt(&m["id"]),
                    m["addr"].as_str().filter(|a| !a.is_empty()).unwrap_or("-"),
                    opt(&m["replicas"]),
                    if m["draining"].as_bool() == Some(true) {
                        ", draining"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        out.push_str(&format!(
            "placement v{}: {} chat groups; members {}\n",
            opt(&p["version"]),
            opt(&p["chat_groups"]),
            list.join(", ")
        ));
    }
    for t in p["leader_transfers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "leader transfer: group {} to node {}\n",
            opt(&t["group"]),
            opt(&t["to"])
        ));
    }
    for m in p["moves"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "move: group {} from node {} to node {}, step {}\n",
            opt(&m["group"]),
            opt(&m["from"]),
            opt(&m["to"]),
            m["step"].as_str().unwrap_or("?")
        ));
    }
    out
}

async fn leader_transfer(a: TransferArgs) -> Result<(), CliError> {
    let body = json!({"group": a.group, "to": a.to});
    let v = call(
        &a.conn,
        "POST",
        "/admin/leader-transfer",
        Some(body),
        TRANSFER_TIMEOUT,
    )
    .await?;
    if a.conn.json {
        println!("{v}");
    } else if v["moved"].as_bool() == Some(false) && v["leader"] == v["previous_leader"] {
        println!(
            "group {}: node {} already leads (term {})",
            a.group,
            opt(&v["leader"]),
            opt(&v["term"])
        );
    } else {
        println!(
            "group {}: leader moved from node {} to node {} (term {})",
            a.group,
            opt(&v["previous_leader"]),
            opt(&v["leader"]),
            opt(&v["term"])
        );
    }
    Ok(())
}

/// Bound of a change that waits for its completion (the server waits up to 300 s).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(320);

pub(crate) fn print_or_json(conn: &AdminConn, v: &Value, line: String) {
    if conn.json {
        println!("{v}");
    } else {
        println!("{line}");
    }
}

async fn node_command(c: NodeCommand) -> Result<(), CliError> {
    match c {
        NodeCommand::Add(a) => {
            let body = json!({"node": a.node, "addr": a.addr});
            let v = call(
                &a.conn,
                "POST",
                "/admin/node-add",
                Some(body),
                STATUS_TIMEOUT,
            )
            .await?;
            let line = if v["added"].as_bool() == Some(true) {
                format!("node {} added at {}", a.node, a.addr)
            } else {
                format!("node {} was already a member at {}", a.node, a.addr)
            };
            print_or_json(&a.conn, &v, line);
        }
        NodeCommand::Remove(a) => {
            let body = json!({"node": a.node, "wait": !a.no_wait});
            let v = call(
                &a.conn,
                "POST",
                "/admin/node-remove",
                Some(body),
                CHANGE_TIMEOUT,
            )
            .await?;
            let line = if v["removed"].as_bool() == Some(true) {
                format!(
                    "node {} drained and removed in {} ms",
                    a.node,
                    opt(&v["elapsed_ms"])
                )
            } else {
                format!("node {} is draining (see `admin status`)", a.node)
            };
            print_or_json(&a.conn, &v, line);
        }
    }
    Ok(())
}

async fn replica_move(a: MoveArgs) -> Result<(), CliError> {
    let body = json!({"group": a.group, "from": a.from, "to": a.to, "wait": !a.no_wait});
    let v = call(
        &a.conn,
        "POST",
        "/admin/replica-move",
        Some(body),
        CHANGE_TIMEOUT,
    )
    .await?;
    let line = if v["done"].as_bool() == Some(true) {
        format!(
            "group {}: replica moved from node {} to node {} in {} ms (replicas {})",
            a.group,
            a.from,
            a.to,
            opt(&v["elapsed_ms"]),
            v["replicas"]
        )
    } else {
        format!(
            "group {}: moving the replica from node {} to node {} (see `admin status`)",
            a.group, a.from, a.to
        )
    };
    print_or_json(&a.conn, &v, line);
    Ok(())
}

async fn group_add(a: GroupAddArgs) -> Result<(), CliError> {
    let body = json!({"count": a.count});
    let v = call(
        &a.conn,
        "POST",
        "/admin/group-add",
        Some(body),
        STATUS_TIMEOUT,
    )
    .await?;
    let added: Vec<String> = v["added"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| format!("{} on {}", opt(&g["id"]), g["replicas"]))
        .collect();
    let line = format!(
        "added groups {}; {} chat groups now",
        added.join(", "),
        opt(&v["chat_groups"])
    );
    print_or_json(&a.conn, &v, line);
    Ok(())
}

async fn rebalance(a: RebalanceArgs) -> Result<(), CliError> {
    let body = json!({"moves_max": a.moves_max, "wait": !a.no_wait});
    let v = call(
        &a.conn,
        "POST",
        "/admin/rebalance",
        Some(body),
        CHANGE_TIMEOUT,
    )
    .await?;
    let moves: Vec<String> = v["moves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "group {} {}→{}",
                opt(&m["group"]),
                opt(&m["from"]),
                opt(&m["to"])
            )
        })
        .collect();
    let transfers: Vec<String> = v["leader_transfers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| format!("group {} →{}", opt(&t["group"]), opt(&t["to"])))
        .collect();
    let line = if moves.is_empty() && transfers.is_empty() {
        "balanced: no move needed".to_owned()
    } else {
        format!(
            "moves: {}; leader transfers: {}",
            if moves.is_empty() {
                "none".to_owned()
            } else {
                moves.join(", ")
            },
            if transfers.is_empty() {
                "none".to_owned()
            } else {
                transfers.join(", ")
            }
        )
    };
    print_or_json(&a.conn, &v, line);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let v = json!({"summary": "node 1: 1 groups", "groups": [
            {"id": 0, "leader": 1, "role": "leader", "term": 2, "committed": 5,
             "applied": 5, "replicas": [1, 2], "followers": [{"node": 2, "lag": 0}],
             "disk_bytes": 3 << 20}],
            "nodes": [{"id": 1, "self": true, "up": true, "version": "0.1.0"},
                      {"id": 2, "self": false, "up": false}],
            "node": {"id": 1, "data_dir_bytes": 70 << 20, "disk_bytes": 64 << 20,
                     "disk_free_bytes": 1u64 << 30}});
        let text = render_status(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "node 1: 1 groups");
        assert!(lines[1].starts_with("GROUP  LEADER  ROLE"));
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "0", "1", "leader", "2", "5", "5", "1,2", "2:0", "3.0", "MiB"
            ]
        );
        assert_eq!(lines[3], "nodes: 1 up v0.1.0, 2 DOWN");
        assert_eq!(
            lines[4],
            "disk of node 1: data dir 70.0 MiB, segment files 64.0 MiB, free 1.0 GiB"
        );
        // s8retention: the replicated retention policy, groups by policy.
        let mut v = v;
        v["groups"][0]["retention"] = json!({"policy": {"entries": 60, "bytes": null},
                                             "retained_from": 9});
        let mut g1 = v["groups"][0].clone();
        g1["id"] = json!(1);
        g1["retention"] = json!({"policy": null, "retained_from": 0});
        v["groups"].as_array_mut().unwrap().push(g1);
        let text = render_status(&v);
        assert!(
            text.contains("retention: entries=60 (groups 0); none (keep everything) (groups 1)"),
            "{text}"
        );
    }
}
