//! Black-box: a replica moved away from a node and back again (issue 3), on real
//! `chatlog serve` processes with `--retain-entries`, so the group's log is purged on
//! every replica while the replica is away.
//!
//! Covered: three nodes and a fourth that joins; the busy group's replica on a follower
//! moves to the fourth node (its node drops it: stops it and deletes its logs, which
//! restart at index 1 with the engine's "reset log start"), writes go on far past the
//! purge point it had, then the replica moves back to the same node and data directory.
//! It must catch up (a snapshot: the others purged what it lacks), append what follows,
//! and serve exactly the leader's history; the node restarted afterwards serves it
//! again. Every wait has a deadline.

#[path = "common/cluster.rs"]
mod cluster;

use std::process::Command;
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options, full_history};
use serde_json::Value;

/// Longest anything that needs an election, a snapshot or a catch-up may take.
const WAIT: Duration = Duration::from_secs(120);
/// `--retain-entries` of every node.
const RETAIN_ENTRIES: u64 = 200;
/// Writers in flight.
const WRITERS: u64 = 8;
/// Bytes of text per message.
const TEXT_BYTES: usize = 200;

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 1),
    )
    .await
}

/// Runs `chatlog admin ARGS --json`; Ok(JSON) on success, Err(stderr) on failure.
fn admin(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .arg("admin")
        .args(args)
        .arg("--json")
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .output()
        .expect("chatlog admin runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// Whether the node at `http` runs a replica of `group`.
fn runs(http: &str, group: u64) -> bool {
    admin(&["status", "--server", http]).expect("status")["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .any(|g| g["id"].as_u64() == Some(group))
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Moves `group`'s replica, asking again while the controller group is between leaders
/// (`UNAVAILABLE`, e.g. right after a node joined).
async fn move_replica(http: &str, group: u64, from: u64, to: u64) {
    let deadline = Instant::now() + WAIT;
    let moved = loop {
        match admin(&[
            "replica",
            "move",
            "--server",
            http,
            "--group",
            &group.to_string(),
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ]) {
            Ok(moved) => break moved,
            Err(e) if e.contains("UNAVAILABLE") && Instant::now() < deadline => {
                eprintln!("move asked again: {}", e.trim());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("move of group {group} from {from} to {to}: {e}"),
        }
    };
    assert_eq!(moved["done"], true, "{moved}");
}

async fn write(clients: &[Client], chat: u64, from: u64, to: u64) {
    cluster::write_messages(clients, chat, (from, to), WRITERS, TEXT_BYTES, WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_away_and_back_catches_up_and_serves_the_same_history() {
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            groups: 2,
            http: true,
            extra: vec!["--retain-entries".into(), RETAIN_ENTRIES.to_string()],
            ..Options::default()
        })
    });
    let http = |c: &Cluster, n: u64| c.http_addr(n);
    wait_until("placement bootstrapped", || {
        admin(&["status", "--server", &http(&cluster, 1)]).expect("status")["placement"]
            ["bootstrapped"]
            .as_bool()
            .unwrap_or(false)
    })
    .await;
    let c1 = connect(&cluster.addr(1), None).await;
    let (_alice, token) = cluster::create_and_login(&c1, "alice", "dev").await;
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push(connect(&cluster.addr(id), Some(token.clone())).await);
    }
    let chat = clients[0]
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "busy".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat created")
        .chat_id;
    let busy = group_of(chat);
    write(&clients, chat, 0, 600).await;

    let four = tokio::task::block_in_place(|| cluster.join(1));
    let leader = tokio::task::block_in_place(|| cluster.leader(busy, 0)).0;
    let away = (1..=3).find(|n| *n != leader).expect("a follower");
    eprintln!("group {busy}: leader {leader}; moving its replica on {away} to {four} and back");

    move_replica(&http(&cluster, leader), busy, away, four).await;
    wait_until("the replica is dropped on its node", || {
        !runs(&http(&cluster, away), busy)
    })
    .await;
    // Far past where the dropped replica's log had been purged to.
    let others: Vec<Client> = clients
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != away)
        .map(|(_, c)| c.clone())
        .collect();
    write(&others, chat, 600, 600 + 5 * RETAIN_ENTRIES).await;

    let leader = tokio::task::block_in_place(|| cluster.leader(busy, 0)).0;
    move_replica(&http(&cluster, leader), busy, four, away).await;
    wait_until("the replica runs on its node again", || {
        runs(&http(&cluster, away), busy)
    })
    .await;
    let head = 600 + 5 * RETAIN_ENTRIES + 100;
    write(&clients, chat, 600 + 5 * RETAIN_ENTRIES, head).await;

    let reference = full_history(&clients[(leader - 1) as usize], chat, WAIT).await;
    assert!(!reference.is_empty(), "the leader serves history");
    let back = &clients[(away - 1) as usize];
    cluster::wait_head(back, away, chat, head + 1, WAIT).await;
    assert_eq!(
        full_history(back, chat, WAIT).await,
        reference,
        "the moved-back replica serves the leader's history"
    );
    // And again after a restart of its node.
    tokio::task::block_in_place(|| {
        cluster.kill(away);
        cluster.restart(away);
    });
    let back = connect(&cluster.addr(away), Some(token.clone())).await;
    cluster::wait_head(&back, away, chat, head + 1, WAIT).await;
    assert_eq!(
        full_history(&back, chat, WAIT).await,
        reference,
        "after a restart"
    );
}
