//! Black-box: cluster changes on real `chatlog serve` processes under steady write load.
//!
//! Covered, in one run of three processes plus a fourth started later: a node joins
//! (`serve --join`, which registers it with `node add`); a replica of the busy group moves
//! to it from the group's leader (`admin replica move`); leadership moves to it (`admin
//! leader-transfer`); `admin rebalance` moves another replica to it and the new node is
//! SIGKILLed right after the move started, then restarted, and the move completes; a node
//! is drained and removed (`admin node remove`); the node that gave up a replica restarts
//! and runs exactly the replicas the placement gives it; a group is added (`admin group
//! add`) and a new chat lands in it; `admin rebalance` spreads the leaders. Writers keep sending all along,
//! retrying with the same client message id on another node after a retryable error.
//! Afterwards every current replica of the busy group serves the same dense log holding
//! every acknowledged send exactly once at its seq (the checks of `common/history.rs`),
//! the removed node is gone from the placement, and the refusals answer clearly:
//! removing a node when the rest could not hold every group's replicas, moving to an
//! unknown node, and moving to a member that is down. Each step's unavailability window (the
//! longest gap between acknowledged writes while it ran) is printed.
//!
//! Every wait has a deadline, so a bug fails the test instead of hanging it. The seed
//! (which node each writer starts on) is printed; `CHATLOG_TEST_SEED` repeats a run.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/history.rs"]
mod history;
#[path = "common/load.rs"]
mod load;
use load::{Acks, to_history_events};

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1::{self, event::Body};
use cluster::{Cluster, Options, full_history, retryable, send_request};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Longest anything that needs an election or a catch-up may take.
const WAIT: Duration = Duration::from_secs(60);
/// Writer tasks per user.
const LANES: u64 = 3;

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

fn status(http: &str) -> Value {
    admin(&["status", "--server", http]).expect("status")
}

/// The replicas of `group` in the placement `http`'s node follows.
fn replicas(http: &str, group: u64) -> Vec<u64> {
    let s = status(http);
    s["placement"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"].as_u64() == Some(group))
        .map(|g| {
            g["replicas"]
                .as_array()
                .expect("replicas")
                .iter()
                .map(|n| n.as_u64().expect("id"))
                .collect()
        })
        .unwrap_or_default()
}

/// The leader of `group` as the node at `http` sees it (it must host a replica).
fn leader_seen_by(http: &str, group: u64) -> Option<u64> {
    status(http)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["id"].as_u64() == Some(group))
        .and_then(|g| g["leader"].as_u64())
}

/// Runs one step and prints its unavailability window.
async fn step<T>(
    name: &str,
    acks: &Acks,
    windows: &mut Vec<(String, Duration, Duration)>,
    f: impl std::future::Future<Output = T>,
) -> T {
    let before = acks.count();
    let started = Instant::now();
    let out = f.await;
    let took = started.elapsed();
    // Writes must be flowing again after the step.
    let deadline = Instant::now() + WAIT;
    while acks.count() < before + 10 {
        assert!(Instant::now() < deadline, "{name}: writes did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = acks.longest_gap(started, Instant::now());
    eprintln!("step {name}: took {took:?}; longest gap between acknowledged writes {gap:?}");
    windows.push((name.into(), took, gap));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_replicas_move_and_groups_are_added_under_load() {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cluster::seed());
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start(Options {
            groups: 2,
            http: true,
            ..Options::default()
        })
    });
    let http = |c: &Cluster, n: u64| c.http_addr(n);
    eprintln!("cluster up in {:?}", started.elapsed());

    // The placement is bootstrapped into group 0 from the flags.
    let deadline = Instant::now() + WAIT;
    while !status(&http(&cluster, 1))["placement"]["bootstrapped"]
        .as_bool()
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "placement bootstrapped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let c1 = connect(&cluster.addr(1), None).await;
    let (alice, alice_token) = cluster::create_and_login(&c1, "alice", "dev").await;
    let c2 = connect(&cluster.addr(2), None).await;
    let (bob, bob_token) = cluster::create_and_login(&c2, "bob", "dev").await;
    let a = connect(&cluster.addr(1), Some(alice_token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "busy".into(),
            member_ids: vec![bob],
        })
        .await
        .expect("chat created")
        .chat_id;
    let busy = group_of(chat);
    eprintln!("users {alice} and {bob}; chat {chat} in group {busy}");

    // Writers: each user with a client on every initial node, several lanes each.
    let hist = Arc::new(history::History::default());
    let acks = Arc::new(Acks::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, (user, token)) in [(alice, &alice_token), (bob, &bob_token)]
        .into_iter()
        .enumerate()
    {
        let mut clients = Vec::new();
        for id in 1..=3 {
            clients.push(connect(&cluster.addr(id), Some(token.clone())).await);
        }
        for lane in 0..LANES {
            let (stop, acks, hist, clients) = (
                Arc::clone(&stop),
                Arc::clone(&acks),
                Arc::clone(&hist),
                clients.clone(),
            );
            let start = rng.random_range(0..clients.len());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("w{w}.{lane}:{i}");
                    let cmid = 1 + lane * 1_000_000 + i;
                    let invoked = hist.tick();
                    let mut at = start + i as usize;
                    let deadline = Instant::now() + WAIT;
                    let outcome = loop {
                        match clients[at % clients.len()]
                            .send_message(send_request(chat, cmid, &text))
                            .await
                        {
                            Ok(r) => {
                                acks.times.lock().expect("lock").push(Instant::now());
                                break history::Outcome::Acked { seq: r.seq };
                            }
                            Err(e) if retryable(&e) && Instant::now() < deadline => {
                                at += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("send {text:?}: {e}"),
                        }
                    };
                    hist.record_send(history::Send {
                        chat,
                        sender: user,
                        cmid,
                        text,
                        outcome,
                        invoked,
                        completed: hist.tick(),
                    });
                    i += 1;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(acks.count() > 0, "writers make progress");
    let mut windows = Vec::new();

    // 1. A fourth node joins through node 1's HTTP port.
    let four = step(
        "node join (serve --join, node add)",
        &acks,
        &mut windows,
        async { tokio::task::block_in_place(|| cluster.join(1)) },
    )
    .await;
    let members: Vec<u64> = status(&http(&cluster, 1))["placement"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(members, vec![1, 2, 3, four], "node {four} is a member");

    // Refusals: a move to a node nobody knows, and to a member that is down.
    let err = admin(&[
        "replica",
        "move",
        "--server",
        &http(&cluster, 2),
        "--group",
        &busy.to_string(),
        "--from",
        "1",
        "--to",
        "9",
    ])
    .expect_err("a move to an unknown node is refused");
    assert!(err.contains("NOT_FOUND") && err.contains("node 9"), "{err}");
    eprintln!("refused as expected: {}", err.trim());
    tokio::task::block_in_place(|| cluster.kill(four));
    let err = admin(&[
        "replica",
        "move",
        "--server",
        &http(&cluster, 2),
        "--group",
        &busy.to_string(),
        "--from",
        "1",
        "--to",
        &four.to_string(),
    ])
    .expect_err("a move to a member that is down is refused");
    assert!(err.contains("CONFLICT") && err.contains("down"), "{err}");
    eprintln!("refused as expected: {}", err.trim());
    tokio::task::block_in_place(|| cluster.restart(four));

    // 2. Move the busy group's replica away from its leader to the new node.
    let leader = tokio::task::block_in_place(|| cluster.leader(busy, 0)).0;
    let moved = step(
        "replica move (from the leader)",
        &acks,
        &mut windows,
        async {
            admin(&[
                "replica",
                "move",
                "--server",
                &http(&cluster, 2),
                "--group",
                &busy.to_string(),
                "--from",
                &leader.to_string(),
                "--to",
                &four.to_string(),
            ])
        },
    )
    .await
    .expect("replica move");
    assert_eq!(moved["done"], true, "{moved}");
    let after_move = replicas(&http(&cluster, 1), busy);
    assert!(
        after_move.contains(&four) && !after_move.contains(&leader),
        "{after_move:?}"
    );
    eprintln!(
        "group {busy} moved from node {leader} to node {four} in {} ms",
        moved["elapsed_ms"]
    );
    // The old replica is dropped on its node: its status no longer lists the group.
    let deadline = Instant::now() + WAIT;
    while status(&http(&cluster, leader))["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .any(|g| g["id"].as_u64() == Some(busy))
    {
        assert!(
            Instant::now() < deadline,
            "node {leader} dropped its replica of {busy}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. Leadership of the busy group moves to the new node.
    let current = leader_seen_by(&http(&cluster, four), busy).expect("a leader");
    let transferred = step(
        "leader transfer to the new node",
        &acks,
        &mut windows,
        async {
            admin(&[
                "leader-transfer",
                "--server",
                &http(&cluster, current),
                "--group",
                &busy.to_string(),
                "--to",
                &four.to_string(),
            ])
        },
    )
    .await
    .expect("leader transfer");
    assert_eq!(transferred["leader"].as_u64(), Some(four), "{transferred}");

    // 4. Rebalance moves one replica to the new node; the target is SIGKILLed right after
    // the move started and restarted: the move resumes (run by the group's leader from the
    // step recorded in group 0) and completes.
    let plan = admin(&[
        "rebalance",
        "--moves-max",
        "1",
        "--no-wait",
        "--server",
        &http(&cluster, 2),
    ])
    .expect("rebalance");
    let moves = plan["moves"].as_array().expect("moves").clone();
    assert_eq!(moves.len(), 1, "one move toward the emptier node 4: {plan}");
    let (rg, rto) = (
        moves[0]["group"].as_u64().expect("group"),
        moves[0]["to"].as_u64().expect("to"),
    );
    assert_eq!(rto, four, "{plan}");
    step(
        "rebalance move, target killed and restarted",
        &acks,
        &mut windows,
        async {
            tokio::task::block_in_place(|| cluster.kill(four));
            let s = status(&http(&cluster, 2));
            let during: Vec<String> = s["placement"]["moves"]
                .as_array()
                .expect("moves")
                .iter()
                .map(|m| format!("group {} step {}", m["group"], m["step"]))
                .collect();
            eprintln!("node {four} killed; moves in progress: {during:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            tokio::task::block_in_place(|| cluster.restart(four));
            let deadline = Instant::now() + WAIT;
            loop {
                let s = status(&http(&cluster, 2));
                let done = s["placement"]["moves"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
                    && replicas(&http(&cluster, 2), rg).contains(&four);
                if done {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the interrupted move completes: {}",
                    s["placement"]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    eprintln!("group {rg} now on {:?}", replicas(&http(&cluster, 2), rg));

    // 5. Drain and remove a node that holds a replica of the busy group.
    let gone = *after_move
        .iter()
        .find(|n| **n != four)
        .expect("another replica");
    let removed = step("node remove (drain)", &acks, &mut windows, async {
        admin(&[
            "node",
            "remove",
            &gone.to_string(),
            "--server",
            &http(&cluster, four),
        ])
    })
    .await
    .expect("node remove");
    assert_eq!(removed["removed"], true, "{removed}");
    let placement = &status(&http(&cluster, four))["placement"];
    for g in placement["groups"].as_array().expect("groups") {
        let r: Vec<u64> = g["replicas"]
            .as_array()
            .expect("r")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert!(
            !r.contains(&gone),
            "group {} still on removed node {gone}: {r:?}",
            g["id"]
        );
        assert_eq!(r.len(), 3, "group {} keeps 3 replicas: {r:?}", g["id"]);
    }
    // The drained node dropped every replica but its copy of group 0.
    let deadline = Instant::now() + WAIT;
    loop {
        let local: Vec<u64> = status(&http(&cluster, gone))["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .filter_map(|g| g["id"].as_u64())
            .collect();
        if local == [0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {gone} still runs groups {local:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| cluster.kill(gone));
    let alive: Vec<u64> = cluster.ids().filter(|n| *n != gone).collect();
    eprintln!("node {gone} drained and removed; nodes now {alive:?}");

    // Refusal: removing another node would leave 2 nodes for groups of 3 replicas.
    let err = admin(&[
        "node",
        "remove",
        &alive[0].to_string(),
        "--server",
        &http(&cluster, four),
    ])
    .expect_err("a removal below the replication factor is refused");
    assert!(
        err.contains("CONFLICT") && err.contains("add a node first"),
        "{err}"
    );
    eprintln!("refused as expected: {}", err.trim());

    // 6. The node that gave up its replica of the busy group restarts: it follows the
    // placement in group 0, not the static flags, so the group stays away.
    step(
        "restart of a node that gave a replica away",
        &acks,
        &mut windows,
        async {
            tokio::task::block_in_place(|| {
                cluster.kill(leader);
                cluster.restart(leader);
            });
        },
    )
    .await;
    let local: Vec<u64> = status(&http(&cluster, leader))["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["id"].as_u64())
        .collect();
    let expected: Vec<u64> = {
        let p = &status(&http(&cluster, four))["placement"];
        p["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .filter(|g| {
                g["id"].as_u64() == Some(0)
                    || g["replicas"]
                        .as_array()
                        .expect("r")
                        .iter()
                        .any(|n| n.as_u64() == Some(leader))
            })
            .filter_map(|g| g["id"].as_u64())
            .collect()
    };
    assert_eq!(
        local, expected,
        "node {leader} runs the replicas the placement gives it"
    );

    // 7. A new group; new chats spread over every group, so one lands in it.
    let added = step("group add", &acks, &mut windows, async {
        admin(&[
            "group",
            "add",
            "--count",
            "1",
            "--server",
            &http(&cluster, alive[0]),
        ])
    })
    .await
    .expect("group add");
    let new_group = added["added"][0]["id"].as_u64().expect("a new group");
    assert_eq!(added["chat_groups"].as_u64(), Some(3), "{added}");
    let entry = connect(&cluster.addr(alive[0]), Some(alice_token.clone())).await;
    let mut new_chat = None;
    let deadline = Instant::now() + WAIT;
    while new_chat.is_none() {
        assert!(
            Instant::now() < deadline,
            "a chat lands in group {new_group}"
        );
        match entry
            .create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: "new".into(),
                member_ids: vec![bob],
            })
            .await
        {
            Ok(r) if group_of(r.chat_id) == new_group => new_chat = Some(r.chat_id),
            Ok(_) => {}
            // The new group elects its first leader.
            Err(e) if retryable(&e) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("create chat: {e}"),
        }
    }
    let new_chat = new_chat.expect("set");
    let mut new_acked = Vec::new();
    for i in 0..5u64 {
        let r = entry
            .send_message(send_request(new_chat, 1 + i, &format!("new {i}")))
            .await
            .expect("send in the new group");
        new_acked.push(r.seq);
    }
    eprintln!("chat {new_chat} in new group {new_group}: seqs {new_acked:?}");

    // 8. Rebalance spreads leaders: every chat group is on all three nodes now, so
    // after it no node leads two chat groups more than another.
    let via = http(&cluster, alive[0]);
    let balanced = step("rebalance leaders", &acks, &mut windows, async {
        let v = admin(&["rebalance", "--moves-max", "4", "--server", &via]).expect("rebalance");
        let deadline = Instant::now() + WAIT;
        loop {
            let s = status(&via);
            let pending = s["placement"]["leader_transfers"]
                .as_array()
                .map_or(0, Vec::len);
            let mut led = std::collections::BTreeMap::<u64, usize>::new();
            for n in &alive {
                led.insert(*n, 0);
            }
            for g in s["groups"].as_array().expect("groups") {
                if g["id"].as_u64() != Some(0)
                    && let Some(l) = g["leader"].as_u64()
                {
                    *led.entry(l).or_default() += 1;
                }
            }
            let (lo, hi) = (led.values().min().copied(), led.values().max().copied());
            if pending == 0 && hi.unwrap_or(0) <= lo.unwrap_or(0) + 1 {
                break (v, led);
            }
            assert!(
                Instant::now() < deadline,
                "leaders spread: {led:?}, {}",
                s["placement"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    eprintln!(
        "rebalance: {}; chat groups led per node {:?}",
        balanced.0, balanced.1
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let total = hist.sends.lock().expect("lock").len();
    eprintln!("{total} sends acknowledged");

    // Every current replica of the busy group serves the same log with every ack once.
    let holders: BTreeSet<u64> = replicas(&http(&cluster, four), busy).into_iter().collect();
    assert!(holders.contains(&four), "{holders:?}");
    for n in &holders {
        let c = connect(&cluster.addr(*n), Some(alice_token.clone())).await;
        let events = full_history(&c, chat, WAIT).await;
        hist.record_log(*n, chat, to_history_events(&events));
        let fresh = full_history(&c, new_chat, WAIT).await;
        let posted: Vec<u64> = fresh
            .iter()
            .filter(|e| matches!(e.body, Some(Body::MessagePosted(_))))
            .map(|e| e.seq)
            .collect();
        if replicas(&http(&cluster, four), new_group).contains(n) {
            assert_eq!(posted, new_acked, "node {n}: the new chat's messages");
        }
    }
    let mut failed = false;
    for (name, violations) in history::check_all(&hist) {
        if !violations.is_empty() {
            failed = true;
            eprintln!("VIOLATED {name}:");
            for v in violations.iter().take(10) {
                eprintln!("  {v}");
            }
        }
    }
    assert!(!failed, "history checks");
    eprintln!("unavailability windows (longest gap between acknowledged writes per step):");
    for (name, took, gap) in &windows {
        eprintln!("  {name:<46} took {took:>10.2?}  gap {gap:>10.2?}");
    }
    eprintln!("test took {:?}", started.elapsed());
}
