//! Black-box (session 8): the retention policy is replicated state, on three real
//! `chatlog serve` processes.
//!
//! Covered: `--retain-entries` seeds every group's policy (seen by `admin retention show`
//! on every node); `chatlog admin retention set` changes it while writers keep writing;
//! `/admin/status` shows it per group; after every replica applied the same log, each
//! group's encoded state digest is the same on every node and every node serves the same
//! retained history; then the whole cluster is killed (SIGKILL) and restarted with other
//! `--retain-*` flags: the replicated policy stays (the nodes log that their flags
//! differ), replicas still agree byte for byte after more writes, and history is trimmed
//! under the replicated policy, not the new flags.
//!
//! Every wait has a deadline. The seed (writer order) is printed; set
//! `CHATLOG_TEST_SEED` to repeat a run.

#[path = "common/cluster.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatlog_wire::client::Client;
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options, full_history};
use serde_json::Value;

/// Longest anything that needs an election, a catch-up or a restart may take.
const WAIT: Duration = Duration::from_secs(90);
/// The policy the first flags seed, the one set while serving, and the flags of the
/// restart (which must change nothing).
const SEEDED_ENTRIES: u64 = 400;
const SET_ENTRIES: u64 = 60;
const RESTART_ENTRIES: u64 = 5_000;
/// Bytes of text per message.
const TEXT_BYTES: usize = 200;
/// The log line a node prints when its flags differ from a group's replicated policy.
const DIFFERS: &str = "replicated policy differs";

/// Runs `chatlog ARGS`, panicking with its stderr on failure.
fn chatlog(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(args)
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .env_remove("CHATLOG_ADMIN_SERVER")
        .env("RUST_LOG", "warn")
        .output()
        .expect("chatlog runs");
    assert!(
        out.status.success(),
        "chatlog {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `admin retention show --json` of node `id`.
fn show(cluster: &Cluster, id: u64) -> Value {
    let http = cluster.http_addr(id);
    json(&chatlog(&[
        "admin",
        "retention",
        "show",
        "--json",
        "--server",
        &http,
    ]))
}

fn policy(entries: Option<u64>) -> Value {
    serde_json::json!({"entries": entries, "bytes": null})
}

/// Waits until every node reports every group at the same applied index with the same
/// state digest and policy `want`; returns group → (applied, retained_from).
fn wait_agreement(cluster: &Cluster, want: &Value) -> BTreeMap<u64, (u64, u64)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let views: Vec<(u64, Value)> = cluster.ids().map(|id| (id, show(cluster, id))).collect();
        let mut by_group: BTreeMap<u64, Vec<(u64, Value)>> = BTreeMap::new();
        for (id, v) in &views {
            for g in v["groups"].as_array().expect("groups") {
                by_group
                    .entry(g["id"].as_u64().expect("id"))
                    .or_default()
                    .push((*id, g.clone()));
            }
        }
        let nodes = cluster.ids().count();
        let mut why = None;
        let mut out = BTreeMap::new();
        for (group, reps) in &by_group {
            let first = &reps[0].1;
            if reps.len() != nodes {
                why = Some(format!("group {group}: {} replicas report", reps.len()));
            } else if let Some((id, g)) = reps.iter().find(|(_, g)| &g["policy"] != want) {
                why = Some(format!(
                    "group {group}: node {id} has policy {}",
                    g["policy"]
                ));
            } else if reps.iter().any(|(_, g)| g["applied"] != first["applied"]) {
                why = Some(format!("group {group}: applied indexes differ: {reps:?}"));
            } else if let Some((id, g)) = reps
                .iter()
                .find(|(_, g)| g["state_digest"] != first["state_digest"])
            {
                // Same applied index, different state: the replicas diverged. Give it a
                // moment in case an apply raced the two reads, then fail.
                why = Some(format!(
                    "group {group}: node {id} state {} at applied {}, node {} state {}",
                    g["state_digest"], g["applied"], reps[0].0, first["state_digest"]
                ));
            }
            out.insert(
                *group,
                (
                    first["applied"].as_u64().unwrap_or(0),
                    first["retained_from"].as_u64().unwrap_or(0),
                ),
            );
        }
        match why {
            None => {
                eprintln!("replicas agree: {out:?}");
                return out;
            }
            Some(w) => {
                assert!(Instant::now() < deadline, "replicas never agreed: {w}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

/// Every node's retained history of `chat`: the same on all, dense, starting above seq 1
/// (retention dropped some). Returns the first seq.
async fn same_history(cluster: &Cluster, token: &str, chat: u64) -> u64 {
    let mut seen: Option<Vec<v1::Event>> = None;
    for id in cluster.ids() {
        let c = connect(&cluster.addr(id), Some(token.to_owned())).await;
        let events = full_history(&c, chat, WAIT).await;
        let (first, head) = (events[0].seq, events.last().expect("events").seq);
        eprintln!("node {id} serves seqs {first}..={head}");
        assert!(first > 1, "node {id}: nothing was trimmed");
        for (k, e) in events.iter().enumerate() {
            assert_eq!(e.seq, first + k as u64, "node {id}: dense seqs");
        }
        if let Some(s) = &seen {
            assert!(s == &events, "node {id} serves another history");
        }
        seen = Some(events);
    }
    seen.expect("nodes")[0].seq
}

/// The chat's group keeps about [`SET_ENTRIES`] Raft entries: trims run every
/// `SET_ENTRIES / 8` entries, so at most that many more (the restart's flags would keep
/// everything written here).
fn check_kept(groups: &BTreeMap<u64, (u64, u64)>, group: u64) {
    let (applied, from) = groups[&group];
    let kept = applied + 1 - from.max(1);
    assert!(
        from > 1 && kept <= SET_ENTRIES + SET_ENTRIES / 8 + 1,
        "group {group}: applied {applied}, retained from {from}: {kept} entries kept"
    );
}

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 1),
    )
    .await
}

fn flags(entries: u64) -> Vec<String> {
    [
        "--retain-entries",
        &entries.to_string(),
        "--segment-mb",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_replicated_changed_while_serving_and_survives_other_flags() {
    let started = Instant::now();
    let _ = cluster::seed();
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            groups: 2,
            http: true,
            extra: flags(SEEDED_ENTRIES),
            env: vec![(
                "RUST_LOG".into(),
                "warn,openraft=error,chatlog_raft::node=info,chatlog_raft::retention=info".into(),
            )],
            capture: vec![DIFFERS.into()],
            ..Options::default()
        })
    });
    let c1 = connect(&cluster.addr(1), None).await;
    let (_ann, token) = cluster::create_and_login(&c1, "ann", "dev").await;
    let a = connect(&cluster.addr(1), Some(token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "policy".into(),
            member_ids: Vec::new(),
        })
        .await
        .expect("chat created")
        .chat_id;
    let clients: Vec<Client> = {
        let mut v = Vec::new();
        for id in cluster.ids() {
            v.push(connect(&cluster.addr(id), Some(token.clone())).await);
        }
        v
    };

    // The flags seeded every group's policy, on every replica.
    tokio::task::block_in_place(|| wait_agreement(&cluster, &policy(Some(SEEDED_ENTRIES))));

    // Change it while writers write (through node 2: it proposes to every group's leader).
    let writing = {
        let clients = clients.clone();
        tokio::spawn(async move {
            cluster::write_messages(&clients, chat, (0, 1500), 8, TEXT_BYTES, WAIT).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http2 = cluster.http_addr(2);
    let out = tokio::task::block_in_place(|| {
        chatlog(&[
            "admin",
            "retention",
            "set",
            "--entries",
            &SET_ENTRIES.to_string(),
            "--server",
            &http2,
        ])
    });
    eprintln!("set: {}", out.trim());
    assert!(out.contains(&format!("entries={SET_ENTRIES}")), "{out}");
    writing.await.expect("writers");

    // `admin status` shows it on each group.
    let http3 = cluster.http_addr(3);
    let status = json(&tokio::task::block_in_place(|| {
        chatlog(&["admin", "status", "--json", "--server", &http3])
    }));
    for g in status["groups"].as_array().expect("groups") {
        assert_eq!(g["retention"]["policy"], policy(Some(SET_ENTRIES)), "{g}");
    }

    // Every replica applied the same log to the same bytes, and serves the same history.
    let before =
        tokio::task::block_in_place(|| wait_agreement(&cluster, &policy(Some(SET_ENTRIES))));
    let group = chatlog_raft::chat::group_of(chat);
    check_kept(&before, group);
    let first_before = same_history(&cluster, &token, chat).await;
    eprintln!("before the restart: {before:?}, chat served from seq {first_before}");

    // The whole cluster dies at once and comes back with other flags.
    for id in cluster.ids().collect::<Vec<_>>() {
        cluster.kill(id);
    }
    cluster.set_extra(flags(RESTART_ENTRIES));
    let ids: Vec<u64> = cluster.ids().collect();
    tokio::task::block_in_place(|| cluster.restart_all(&ids));
    let clients: Vec<Client> = {
        let mut v = Vec::new();
        for id in cluster.ids() {
            v.push(connect(&cluster.addr(id), Some(token.clone())).await);
        }
        v
    };
    cluster::write_messages(&clients, chat, (1500, 1800), 8, TEXT_BYTES, WAIT).await;

    // The replicated policy stays; the replicas still agree byte for byte; history is
    // trimmed under it (the new flags would keep 5,000 entries: everything here).
    let after =
        tokio::task::block_in_place(|| wait_agreement(&cluster, &policy(Some(SET_ENTRIES))));
    check_kept(&after, group);
    let first_after = same_history(&cluster, &token, chat).await;
    assert!(
        first_after > first_before,
        "{first_before} -> {first_after}"
    );
    let told: usize = cluster.ids().map(|id| cluster.captured(id).len()).sum();
    assert!(
        told > 0,
        "no node logged that its flags differ from the policy"
    );
    eprintln!("test took {:?}", started.elapsed());
}
