//! Black-box (issue 9): a replica whose newest segment file holds a bit flip in the last
//! record of its Raft log's entries — entries it had acknowledged, vouched for by a later
//! "synced" marker — must not forget them silently, must take no part in elections until
//! it has them back from the leader, must serve no reads of the chat meanwhile, and must
//! end identical to its peers.
//!
//! Three real `chatlog serve` processes on 127.0.0.1. Posts to one chat (acknowledged,
//! recorded for the history checkers); once the victim (a follower of the chat's group)
//! has written a record vouching for its last entry, the victim AND the group's leader
//! are SIGKILLed, one byte of the victim's record holding that entry is flipped, and the
//! victim restarts next to the third node alone. Without the repair rule the victim would
//! have granted the third node its vote on a shorter log; with it, the group stays
//! without a leader (the victim refuses votes and does not campaign: asserted through
//! `/admin/status`). Then the old leader restarts, the victim is repaired from the
//! leader, and every node serves the same chat log (byte-identical protobuf events)
//! holding every acknowledged post once at its seq (all history checkers).
//!
//! A single node (one replica per group, no one to repair from) with the same kind of
//! flip still refuses to start, naming file and offset.
//!
//! Session 7: the newest segment file cut short (the node's replicas start vote-unknown and
//! probe every voter before they vote, read or accept appends), and damage found by a
//! history read while the node runs (the node's watcher restarts the replica repairing).
//!
//! The seed (the victim when there is a choice) is printed; `CHATLOG_TEST_SEED` repeats.

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/history.rs"]
mod history;
#[path = "common/load.rs"]
mod load;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chatlog::http::client::request;
use chatlog_raft::chat::group_of;
use chatlog_storage::format::{
    BatchBody, OpKind, RECORD_HEADER_BYTES, RECORD_KIND_BATCH, RecordHeader, SEGMENT_HEADER_BYTES,
    SegmentHeader, decode_body,
};
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options, full_history, send_request};
use prost::Message;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Longest anything that needs an election or a catch-up may take.
const WAIT: Duration = Duration::from_secs(60);
/// Posts acknowledged before the fault.
const POSTS: u64 = 30;
/// How long the damaged replica and the third node are left alone: many election
/// timeouts (heartbeat 100 ms, elections after 400–800 ms).
const LEADERLESS_FOR: Duration = Duration::from_secs(3);

/// `GET /admin/status` of a node, as JSON.
async fn status(http: &str) -> Value {
    let r = request(
        http,
        "GET",
        "/admin/status",
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("status of {http}: {e}"));
    assert_eq!(r.status, 200, "status of {http}");
    serde_json::from_slice(&r.body).expect("status JSON")
}

/// The JSON of group `g` in a status.
fn group_json(status: &Value, g: u64) -> Value {
    status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|v| v["id"] == g)
        .cloned()
        .unwrap_or_else(|| panic!("group {g} in {status}"))
}

/// The node that leads group `g` now by its own status (and that every node agrees on),
/// waiting up to [`WAIT`] for one.
async fn current_leader(cluster: &Cluster, g: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut leaders = Vec::new();
        let mut seen = Vec::new();
        for id in cluster.ids() {
            let gv = group_json(&status(&cluster.http_addr(id)).await, g);
            if gv["role"] == "leader" {
                leaders.push(id);
            }
            seen.push(gv["leader"].as_u64());
        }
        if let [leader] = leaders[..]
            && seen.iter().all(|l| *l == Some(leader))
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "no single leader of group {g}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A record of a segment file: offset, length, the highest index of `log` it appends (if
/// any), and the value of `log`'s "synced" marker it writes (if any).
#[derive(Debug, Clone, Copy)]
struct Record {
    offset: usize,
    len: usize,
    appends_through: Option<u64>,
    synced: Option<u64>,
}

/// The valid records of the newest segment file in `dir` that holds any.
fn newest_records(dir: &Path, log: u64) -> Option<(PathBuf, Vec<Record>)> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    for path in segments.into_iter().rev() {
        let bytes = std::fs::read(&path).ok()?;
        let Ok(head) = SegmentHeader::decode(&bytes) else {
            continue;
        };
        let mut out = Vec::new();
        let mut at = SEGMENT_HEADER_BYTES;
        while let Some(h) = bytes
            .get(at..)
            .and_then(|b| RecordHeader::decode(head.salt, b))
        {
            let start = at + RECORD_HEADER_BYTES;
            let Some(body) = bytes.get(start..start + h.body_len as usize) else {
                break;
            };
            let mut rec = Record {
                offset: at,
                len: h.record_bytes(),
                appends_through: None,
                synced: None,
            };
            if h.kind == RECORD_KIND_BATCH
                && let Ok(raw) = decode_body(&h, bytes::Bytes::copy_from_slice(body))
                && let Ok(b) = BatchBody::parse(raw)
            {
                for k in 0..b.op_count() {
                    let op = b.op(k);
                    if op.log_id != log {
                        continue;
                    }
                    match op.kind {
                        OpKind::Append if op.count > 0 => {
                            // Engine index i + 1 holds Raft index i.
                            rec.appends_through = Some(op.index + u64::from(op.count) - 2);
                        }
                        OpKind::PutMeta => {
                            let (key, value) = b.meta(&op);
                            if &key[..] == chatlog_raft::repair::META_SYNCED {
                                rec.synced = chatlog_raft::repair::decode_synced(&value);
                            }
                        }
                        _ => {}
                    }
                }
            }
            out.push(rec);
            at += h.record_bytes();
        }
        if !out.is_empty() {
            return Some((path, out));
        }
    }
    None
}

/// The record holding `log`'s entry `index` and, later in the same file, a record whose
/// marker vouches for it.
fn vouched_record(dir: &Path, log: u64, index: u64) -> Option<(PathBuf, Record)> {
    let (path, recs) = newest_records(dir, log)?;
    let k = recs
        .iter()
        .rposition(|r| r.appends_through.is_some_and(|i| i >= index))?;
    recs[k + 1..]
        .iter()
        .any(|r| r.synced.is_some_and(|s| s >= index))
        .then(|| (path, recs[k]))
}

/// Three nodes (2 groups, HTTP on, `extra` flags), user alice logged in, a client per
/// node with her token, and a group chat of hers titled `title`.
struct Setup {
    cluster: Cluster,
    alice: u64,
    token: String,
    clients: Vec<Client>,
    chat: u64,
}

async fn setup(extra: Vec<String>, title: &str) -> Setup {
    setup_with(
        Options {
            groups: 2,
            http: true,
            extra,
            ..Options::default()
        },
        title,
    )
    .await
}

/// Posts `text` as alice's client message `n + 1` in `chat`, through `clients[n % 3]` and
/// on to the next node on a retryable error until [`WAIT`], and records the acknowledged
/// send in `hist` (the tests' one way of posting, so every acknowledgement is checked).
async fn post_recorded(
    clients: &[Client],
    hist: &history::History,
    chat: u64,
    alice: u64,
    n: u64,
    text: String,
) {
    let cmid = n + 1;
    let invoked = hist.tick();
    let deadline = Instant::now() + WAIT;
    let mut at = n as usize;
    let seq = loop {
        match clients[at % 3]
            .send_message(send_request(chat, cmid, &text))
            .await
        {
            Ok(r) => break r.seq,
            Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                at += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("post {n}: {e}"),
        }
    };
    hist.record_send(history::Send {
        chat,
        sender: alice,
        cmid,
        text,
        outcome: history::Outcome::Acked { seq },
        invoked,
        completed: hist.tick(),
    });
}

/// [`setup`] with the cluster's options given whole.
async fn setup_with(options: Options, title: &str) -> Setup {
    let cluster = tokio::task::block_in_place(|| Cluster::start(options));
    let c1 = cluster::connect_with(
        &cluster.addr(1),
        cluster::client_options(None, Duration::from_secs(5), 2),
    )
    .await;
    let (alice, token) = cluster::create_and_login(&c1, "alice", "dev").await;
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push(
            cluster::connect_with(
                &cluster.addr(id),
                cluster::client_options(Some(token.clone()), Duration::from_secs(5), 2),
            )
            .await,
        );
    }
    let deadline = Instant::now() + WAIT;
    let chat = loop {
        match clients[0]
            .create_chat(v1::CreateChatRequest {
                kind: v1::ChatKind::Group.into(),
                title: title.into(),
                member_ids: vec![],
            })
            .await
        {
            Ok(r) => break r.chat_id,
            Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chat created: {e}"),
        }
    };
    Setup {
        cluster,
        alice,
        token,
        clients,
        chat,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_replica_refuses_votes_and_repairs_from_the_leader() {
    let seed = cluster::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Setup {
        mut cluster,
        alice,
        token,
        clients,
        chat,
    } = setup(Vec::new(), "damage").await;
    let g = group_of(chat);
    let log = chatlog_raft::ids::raft_log(g).expect("a group log");
    let hist = history::History::default();

    // Posts, each acknowledged, retried with the same client message id on another node.
    let post = |n: u64, tag: &'static str| {
        let hist = &hist;
        let clients = &clients;
        async move {
            let text = format!("{tag}:{n}");
            let cmid = n + 1;
            let invoked = hist.tick();
            let deadline = Instant::now() + WAIT;
            let mut at = n as usize;
            let seq = loop {
                match clients[at % 3]
                    .send_message(send_request(chat, cmid, &text))
                    .await
                {
                    Ok(r) => break r.seq,
                    Err(e) if cluster::retryable(&e) && Instant::now() < deadline => {
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("post {n}: {e}"),
                }
            };
            hist.record_send(history::Send {
                chat,
                sender: alice,
                cmid,
                text,
                outcome: history::Outcome::Acked { seq },
                invoked,
                completed: hist.tick(),
            });
        }
    };
    for n in 0..POSTS {
        post(n, "before").await;
    }

    // The leader (as the nodes' own status says), a victim among the followers, the third.
    let leader = current_leader(&cluster, g).await;
    let followers: Vec<u64> = cluster.ids().filter(|n| *n != leader).collect();
    let victim = followers[rng.random_range(0..followers.len())];
    let third = cluster
        .ids()
        .find(|n| *n != leader && *n != victim)
        .expect("a third node");
    eprintln!("chat {chat} in group {g}: leader {leader}, victim {victim}, third {third}");

    // Wait until the victim holds the leader's last entry and a record vouches for it.
    let leader_last = group_json(&status(&cluster.http_addr(leader)).await, g)["last_log_index"]
        .as_u64()
        .expect("leader's last index");
    let deadline = Instant::now() + WAIT;
    let (path, record) = loop {
        let last = group_json(&status(&cluster.http_addr(victim)).await, g)["last_log_index"]
            .as_u64()
            .unwrap_or(0);
        if last >= leader_last
            && let Some(found) = vouched_record(&cluster.dir(victim), log, last)
        {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no vouched record on node {victim}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        current_leader(&cluster, g).await,
        leader,
        "the leader changed while waiting; rerun with the seed"
    );
    cluster.kill(victim);
    cluster.kill(leader);
    let mut bytes = std::fs::read(&path).expect("read segment");
    let at = record.offset + RECORD_HEADER_BYTES + (record.len - RECORD_HEADER_BYTES) / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write segment");
    eprintln!(
        "flipped byte {at} of {} (record at {} holding group {g}'s entries through {:?})",
        path.display(),
        record.offset,
        record.appends_through
    );

    // The victim restarts next to the third node alone. (It announces its client address
    // only after waiting for leaders, which the damaged group will not get.)
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(victim));
    let wait_more = LEADERLESS_FOR.saturating_sub(started.elapsed());
    tokio::time::sleep(wait_more).await;
    let v = status(&cluster.http_addr(victim)).await;
    eprintln!(
        "victim status: storage_damage {}, votes refused {}, group {g}: {}",
        v["storage_damage"],
        v["votes_refused_while_repairing"],
        group_json(&v, g)
    );
    assert!(
        v["storage_damage"]
            .as_str()
            .is_some_and(|d| d.contains(".seg")),
        "the cut names the segment: {v}"
    );
    let gv = group_json(&v, g);
    assert_eq!(
        gv["repair"]["status"], "repairing",
        "group {g} on the victim: {gv}"
    );
    assert!(
        gv["repair"]["required_index"].as_u64() > gv["repair"]["held_index"].as_u64(),
        "{gv}"
    );
    assert!(
        v["votes_refused_while_repairing"].as_u64() > Some(0),
        "the third node asked the victim for votes and was refused: {v}"
    );
    assert_ne!(
        gv["role"], "leader",
        "the damaged replica does not lead: {gv}"
    );
    let t = group_json(&status(&cluster.http_addr(third)).await, g);
    // (A follower keeps naming the last leader it heard of, the killed one.)
    assert!(
        t["role"] != "leader" && t["leader"].as_u64().is_none_or(|l| l == leader),
        "no leader of group {g} while the only other replica is damaged: {t}"
    );
    // Reads of the chat through the damaged replica are refused, not answered short (when
    // the user's own group is the damaged one, already the login is).
    let refused = match chatlog_wire::client::Client::connect(
        &cluster.addr(victim),
        cluster::client_options(Some(token.clone()), Duration::from_secs(5), 0),
    )
    .await
    {
        Err(e) => e,
        Ok(victim_client) => match victim_client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: 1,
                direction: v1::Direction::Forward.into(),
                limit: 100,
            })
            .await
        {
            Err(e) => e,
            Ok(page) => panic!("the damaged replica served {} events", page.events.len()),
        },
    };
    eprintln!("read through the victim: {refused}");
    assert_eq!(
        refused.code(),
        Some(v1::ErrorCode::Unavailable),
        "{refused}"
    );
    assert!(refused.to_string().contains("repairing"), "{refused}");

    // The old leader returns; a leader is elected without the victim's vote and repairs it.
    tokio::task::block_in_place(|| cluster.restart(leader));
    let deadline = Instant::now() + WAIT;
    loop {
        let gv = group_json(&status(&cluster.http_addr(victim)).await, g);
        if gv["repair"]["status"] == "sound" {
            eprintln!("victim repaired: {gv}");
            break;
        }
        assert!(Instant::now() < deadline, "still repairing: {gv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in POSTS..POSTS + 5 {
        post(n, "after").await;
    }

    assert_same_log_everywhere(&cluster, &token, chat, &hist, seed).await;
}

/// Every node serves the same log of `chat`, byte for byte, holding every acknowledged
/// post of `hist` (each node is given up to `WAIT` to apply the last one), and every
/// history checker passes; a failure names `seed`.
async fn assert_same_log_everywhere(
    cluster: &Cluster,
    token: &str,
    chat: u64,
    hist: &history::History,
    seed: u64,
) {
    let last_acked = hist
        .sends
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|s| match s.outcome {
            history::Outcome::Acked { seq } => Some(seq),
            _ => None,
        })
        .max()
        .expect("acknowledged posts");
    let mut logs = Vec::new();
    for id in cluster.ids() {
        let client = cluster::connect_with(
            &cluster.addr(id),
            cluster::client_options(Some(token.to_string()), Duration::from_secs(5), 2),
        )
        .await;
        // Wait until this node has applied the last acknowledged post.
        let deadline = Instant::now() + WAIT;
        let events = loop {
            let events = full_history(&client, chat, WAIT).await;
            if events.last().map_or(0, |e| e.seq) >= last_acked || Instant::now() > deadline {
                break events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        hist.record_log(id, chat, load::to_history_events(&events));
        logs.push((
            id,
            events.iter().map(|e| e.encode_to_vec()).collect::<Vec<_>>(),
        ));
    }
    for (id, log) in &logs[1..] {
        assert!(
            *log == logs[0].1,
            "node {id} serves other bytes than node {}",
            logs[0].0
        );
    }
    let mut failed = Vec::new();
    for (property, violations) in history::check_all(hist) {
        for v in violations.iter().take(10) {
            eprintln!("VIOLATION {property}: {v}");
        }
        if !violations.is_empty() {
            failed.push(property);
        }
    }
    assert!(failed.is_empty(), "seed {seed}: violated {failed:?}");
}

/// The valid records of every segment file in `dir`, oldest file first: (path, records
/// holding appends of `log`).
fn segments_with_appends(dir: &Path, log: u64) -> Vec<(PathBuf, Vec<Record>)> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let mut out = Vec::new();
    for path in segments {
        let bytes = std::fs::read(&path).expect("read segment");
        let Ok(head) = SegmentHeader::decode(&bytes) else {
            continue;
        };
        let mut recs = Vec::new();
        let mut at = SEGMENT_HEADER_BYTES;
        while let Some(h) = bytes
            .get(at..)
            .and_then(|b| RecordHeader::decode(head.salt, b))
        {
            let start = at + RECORD_HEADER_BYTES;
            let Some(body) = bytes.get(start..start + h.body_len as usize) else {
                break;
            };
            if h.kind == RECORD_KIND_BATCH
                && let Ok(raw) = decode_body(&h, bytes::Bytes::copy_from_slice(body))
                && let Ok(b) = BatchBody::parse(raw)
                && (0..b.op_count()).any(|k| {
                    let op = b.op(k);
                    op.log_id == log && op.kind == OpKind::Append && op.count > 0
                })
            {
                recs.push(Record {
                    offset: at,
                    len: h.record_bytes(),
                    appends_through: None,
                    synced: None,
                });
            }
            at += h.record_bytes();
        }
        out.push((path, recs));
    }
    out
}

/// Session 6: damage in an OLDER (sealed) segment file of one replica. Three real
/// `chatlog serve` processes with 1 MiB segments; 8 KiB posts until the victim (a follower
/// of the chat's group) has sealed a segment holding the group's entries; the victim and
/// the leader are SIGKILLed, one byte of a record of the group's entries in the victim's
/// OLDEST segment is flipped (a segment the engine's checkpoint covers: open does not
/// read it; the replica's start, which re-applies the log, does), and the victim restarts
/// next to the third node alone: it starts (no fail-stop), its group is "repairing", it
/// refuses the third node's votes and the group stays leaderless. Then the old leader
/// returns, the victim repairs from it, and every node serves the same chat log (byte-
/// identical protobuf events) holding every acknowledged post once at its seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_an_older_segment_is_repaired_from_the_leader() {
    let seed = cluster::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Setup {
        mut cluster,
        alice,
        token,
        clients,
        chat,
    } = setup(vec!["--segment-mb".into(), "1".into()], "older damage").await;
    let g = group_of(chat);
    let log = chatlog_raft::ids::raft_log(g).expect("a group log");
    let hist = history::History::default();
    let mut next_post = 0u64;
    // 8 KiB of seeded letters (not compressible to nothing).
    let mut text_of = |n: u64, tag: &str| -> String {
        let body: String = (0..8192)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect();
        format!("{tag}:{n}:{body}")
    };
    let mut texts = Vec::new();
    for n in 0..400 {
        texts.push(text_of(n, "p"));
    }
    let post = |n: u64, text: String| post_recorded(&clients, &hist, chat, alice, n, text);

    let leader = current_leader(&cluster, g).await;
    let followers: Vec<u64> = cluster.ids().filter(|n| *n != leader).collect();
    let victim = followers[rng.random_range(0..followers.len())];
    let third = cluster
        .ids()
        .find(|n| *n != leader && *n != victim)
        .expect("a third node");
    eprintln!(
        "seed {seed}: chat {chat} in group {g}: leader {leader}, victim {victim}, third {third}"
    );
    // Until the victim's oldest segment holding the group's entries is sealed (a newer
    // segment holds them too).
    loop {
        for _ in 0..40 {
            post(next_post, texts[next_post as usize].clone()).await;
            next_post += 1;
        }
        let with_appends = segments_with_appends(&cluster.dir(victim), log)
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .count();
        if with_appends >= 2 {
            break;
        }
        assert!(next_post < 360, "no second segment on node {victim}");
    }
    assert_eq!(
        current_leader(&cluster, g).await,
        leader,
        "the leader changed while posting; rerun with the seed"
    );
    // The victim holds the leader's last entry.
    let leader_last = group_json(&status(&cluster.http_addr(leader)).await, g)["last_log_index"]
        .as_u64()
        .expect("leader's last index");
    let deadline = Instant::now() + WAIT;
    while group_json(&status(&cluster.http_addr(victim)).await, g)["last_log_index"]
        .as_u64()
        .unwrap_or(0)
        < leader_last
    {
        assert!(Instant::now() < deadline, "node {victim} does not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(victim);
    cluster.kill(leader);
    let (path, recs) = segments_with_appends(&cluster.dir(victim), log)
        .into_iter()
        .find(|(_, r)| !r.is_empty())
        .expect("an older segment");
    let record = recs[recs.len() / 2];
    let mut bytes = std::fs::read(&path).expect("read segment");
    let at = record.offset + RECORD_HEADER_BYTES + (record.len - RECORD_HEADER_BYTES) / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write segment");
    eprintln!(
        "flipped byte {at} of {} (record at {}, of {} holding group {g}'s entries there)",
        path.display(),
        record.offset,
        recs.len()
    );

    // The victim restarts next to the third node alone.
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(victim));
    tokio::time::sleep(LEADERLESS_FOR.saturating_sub(started.elapsed())).await;
    let v = status(&cluster.http_addr(victim)).await;
    let gv = group_json(&v, g);
    eprintln!(
        "victim status: votes refused {}, group {g}: {gv}",
        v["votes_refused_while_repairing"]
    );
    assert_eq!(
        gv["repair"]["status"], "repairing",
        "group {g} on the victim: {gv}"
    );
    assert!(
        gv["repair"]["required_index"].as_u64() > gv["repair"]["held_index"].as_u64(),
        "{gv}"
    );
    assert!(
        v["votes_refused_while_repairing"].as_u64() > Some(0),
        "the third node asked the victim for votes and was refused: {v}"
    );
    assert_ne!(
        gv["role"], "leader",
        "the damaged replica does not lead: {gv}"
    );
    let t = group_json(&status(&cluster.http_addr(third)).await, g);
    assert!(
        t["role"] != "leader" && t["leader"].as_u64().is_none_or(|l| l == leader),
        "no leader of group {g} while the only other replica is damaged: {t}"
    );

    // The old leader returns; the victim repairs from the group's leader.
    tokio::task::block_in_place(|| cluster.restart(leader));
    let deadline = Instant::now() + WAIT;
    loop {
        let gv = group_json(&status(&cluster.http_addr(victim)).await, g);
        if gv["repair"]["status"] == "sound" {
            eprintln!("victim repaired: {gv}");
            break;
        }
        assert!(Instant::now() < deadline, "still repairing: {gv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in next_post..next_post + 5 {
        post(n, format!("after:{n}")).await;
    }

    assert_same_log_everywhere(&cluster, &token, chat, &hist, seed).await;
}

/// A node whose groups have one replica has no one to repair from: the same flip (a
/// synced record followed by later ones) still stops it at start, naming file and offset,
/// instead of starting with entries it acknowledged cut away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_single_node_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = server::Server::start(dir.path(), &server::NO_RATE_LIMITS);
    let client = cluster::connect_with(
        &node.addr,
        cluster::client_options(None, Duration::from_secs(5), 2),
    )
    .await;
    let (_, token) = cluster::create_and_login(&client, "solo", "dev").await;
    let client = cluster::connect_with(
        &node.addr,
        cluster::client_options(Some(token), Duration::from_secs(5), 2),
    )
    .await;
    let chat = client
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "solo".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat created")
        .chat_id;
    for n in 0..20 {
        client
            .send_message(send_request(chat, n + 1, &format!("m{n}")))
            .await
            .expect("acknowledged");
    }
    node.kill();
    let log = chatlog_raft::ids::raft_log(group_of(chat)).expect("a group log");
    let (path, recs) = newest_records(dir.path(), log).expect("records");
    let victim = recs[recs.len() / 2];
    let mut bytes = std::fs::read(&path).expect("read segment");
    bytes[victim.offset + RECORD_HEADER_BYTES + (victim.len - RECORD_HEADER_BYTES) / 2] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write segment");
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_chatlog"))
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--groups",
                    "4",
                    "--data-dir",
                ])
                .arg(&dir)
                .env("RUST_LOG", "warn")
                .env_remove("CHATLOG_ADMIN_TOKEN")
                .output()
                .expect("chatlog serve runs")
        }
    })
    .await
    .expect("joined");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started over damage: {stderr}");
    let at = format!("offset {}", victim.offset);
    assert!(
        stderr.contains(&*path.to_string_lossy()) && stderr.contains(&at),
        "the refusal names {} and {at}: {stderr}",
        path.display()
    );
}

/// Session 6: the same for damage in an OLDER segment of a single node (one replica per
/// group): nothing to repair from, so its start (which re-applies the log and reads the
/// damaged record) stops, naming the segment file and the record's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_damaged_in_an_older_segment_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut extra: Vec<&str> = server::NO_RATE_LIMITS.to_vec();
    extra.extend(["--segment-mb", "1"]);
    let node = server::Server::start(dir.path(), &extra);
    let client = cluster::connect_with(
        &node.addr,
        cluster::client_options(None, Duration::from_secs(5), 2),
    )
    .await;
    let (_, token) = cluster::create_and_login(&client, "solo", "dev").await;
    let client = cluster::connect_with(
        &node.addr,
        cluster::client_options(Some(token), Duration::from_secs(5), 2),
    )
    .await;
    let chat = client
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "solo".into(),
            member_ids: vec![],
        })
        .await
        .expect("chat created")
        .chat_id;
    let log = chatlog_raft::ids::raft_log(group_of(chat)).expect("a group log");
    let mut n = 0u64;
    while segments_with_appends(dir.path(), log)
        .iter()
        .filter(|(_, r)| !r.is_empty())
        .count()
        < 2
    {
        let body: String = (0..8192)
            .map(|k| char::from(b'a' + ((n * 31 + k * 7) % 26) as u8))
            .collect();
        client
            .send_message(send_request(chat, n + 1, &format!("m{n}:{body}")))
            .await
            .expect("acknowledged");
        n += 1;
        assert!(n < 400, "no second segment");
    }
    node.kill();
    let (path, recs) = segments_with_appends(dir.path(), log)
        .into_iter()
        .find(|(_, r)| !r.is_empty())
        .expect("an older segment");
    let victim = recs[recs.len() / 2];
    let mut bytes = std::fs::read(&path).expect("read segment");
    bytes[victim.offset + RECORD_HEADER_BYTES + (victim.len - RECORD_HEADER_BYTES) / 2] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write segment");
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_chatlog"))
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--groups",
                    "4",
                    "--segment-mb",
                    "1",
                    "--data-dir",
                ])
                .arg(&dir)
                .env("RUST_LOG", "warn")
                .env_remove("CHATLOG_ADMIN_TOKEN")
                .output()
                .expect("chatlog serve runs")
        }
    })
    .await
    .expect("joined");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started over damage: {stderr}");
    let at = format!("offset {}", victim.offset);
    assert!(
        stderr.contains(&*path.to_string_lossy()) && stderr.contains(&at),
        "the refusal names {} and {at}: {stderr}",
        path.display()
    );
}

/// Session 7: the NEWEST segment file of one replica cut short (`truncate`). Nothing after
/// the cut says what the lost tail held — entries, the vote, markers of any group — so
/// every replica of that node starts "repairing, vote unknown": it votes for no one,
/// serves no reads and accepts no appends until it has probed EVERY other voter of its
/// group for its vote and last index (`chatlog_raft::vote_probe`). Three real processes:
/// the victim (a follower of the chat's group) and the leader are SIGKILLed, the victim's
/// newest segment is cut before the record holding the group's last entries, and the
/// victim restarts next to the third node alone: a voter is down, so the probe waits, the
/// group stays leaderless and the victim refuses votes. The old leader returns: the probe
/// finishes (`vote_probes_finished`), the victim repairs through the leader's last index,
/// and every node serves the same chat log with every history checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_segment_cut_short_is_repaired_after_probing_every_voter() {
    let seed = cluster::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Setup {
        mut cluster,
        alice,
        token,
        clients,
        chat,
    } = setup(vec![], "newest cut short").await;
    let g = group_of(chat);
    let log = chatlog_raft::ids::raft_log(g).expect("a group log");
    let hist = history::History::default();
    let post = |n: u64, text: String| post_recorded(&clients, &hist, chat, alice, n, text);
    for n in 0..POSTS {
        post(n, format!("before:{n}")).await;
    }
    let leader = current_leader(&cluster, g).await;
    let followers: Vec<u64> = cluster.ids().filter(|n| *n != leader).collect();
    let victim = followers[rng.random_range(0..followers.len())];
    let third = cluster
        .ids()
        .find(|n| *n != leader && *n != victim)
        .expect("a third node");
    eprintln!(
        "seed {seed}: chat {chat} in group {g}: leader {leader}, victim {victim}, third {third}"
    );
    // The victim holds the leader's last entry.
    let leader_last = group_json(&status(&cluster.http_addr(leader)).await, g)["last_log_index"]
        .as_u64()
        .expect("leader's last index");
    let deadline = Instant::now() + WAIT;
    while group_json(&status(&cluster.http_addr(victim)).await, g)["last_log_index"]
        .as_u64()
        .unwrap_or(0)
        < leader_last
    {
        assert!(Instant::now() < deadline, "node {victim} does not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(victim);
    cluster.kill(leader);
    // Cut the newest segment before the record holding the group's last entries.
    let (path, recs) = newest_records(&cluster.dir(victim), log).expect("a newest segment");
    let k = recs
        .iter()
        .rposition(|r| r.appends_through.is_some())
        .expect("the newest segment holds the group's entries");
    let cut_at = recs[k].offset;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open segment");
    file.set_len(cut_at as u64).expect("truncate segment");
    file.sync_all().expect("sync");
    eprintln!(
        "cut {} at {cut_at} (record {k} of {}, appending group {g} through {:?})",
        path.display(),
        recs.len(),
        recs[k].appends_through
    );

    // The victim restarts next to the third node alone: a voter is down, so it cannot
    // probe, and stays vote-unknown.
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(victim));
    tokio::time::sleep(LEADERLESS_FOR.saturating_sub(started.elapsed())).await;
    let v = status(&cluster.http_addr(victim)).await;
    let gv = group_json(&v, g);
    eprintln!(
        "victim status: damage {}, votes refused {}, probes {}, group {g}: {gv}",
        v["storage_damage"], v["votes_refused_while_repairing"], v["vote_probes_finished"]
    );
    assert_eq!(gv["repair"]["status"], "repairing", "{gv}");
    assert!(
        gv["repair"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("vote unknown")),
        "{gv}"
    );
    assert_eq!(
        v["vote_probes_finished"], 0,
        "a voter is down: no probe finished"
    );
    assert!(
        v["votes_refused_while_repairing"].as_u64() > Some(0),
        "the third node asked the victim for votes and was refused: {v}"
    );
    assert_ne!(gv["role"], "leader", "{gv}");
    let t = group_json(&status(&cluster.http_addr(third)).await, g);
    assert!(
        t["role"] != "leader" && t["leader"].as_u64().is_none_or(|l| l == leader),
        "no leader of group {g} while the only other replica is vote-unknown: {t}"
    );

    // The old leader returns: every voter answers, the victim saves the vote of the
    // highest committed term and repairs through its leader's last index.
    tokio::task::block_in_place(|| cluster.restart(leader));
    let deadline = Instant::now() + WAIT;
    loop {
        let v = status(&cluster.http_addr(victim)).await;
        let gv = group_json(&v, g);
        if gv["repair"]["status"] == "sound" {
            eprintln!(
                "victim repaired: probes {}, {gv}",
                v["vote_probes_finished"]
            );
            assert!(v["vote_probes_finished"].as_u64() > Some(0), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "still repairing: {gv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in POSTS..POSTS + 5 {
        post(n, format!("after:{n}")).await;
    }
    assert_same_log_everywhere(&cluster, &token, chat, &hist, seed).await;
}

/// Session 7: damage found WHILE RUNNING, by a history read, drives the node's watcher
/// (`chatlog_raft::damage_watch`) in a real process. Three `chatlog serve` processes with
/// 1 MiB segments; 8 KiB posts until the victim's oldest segment holding the chat's group
/// is sealed; the victim takes a state-machine checkpoint at its head (`/admin/snapshot`)
/// and restarts cleanly, so nothing has read its old entries since (the read cache is
/// empty and the start re-applies nothing); it is made the group's leader. Then one byte
/// of a record of that old segment is flipped in place while it runs, and the chat's
/// history is read through it from seq 1: the read must not return the damaged bytes,
/// the watcher must stop the replica (it stops leading), cut its log before the damage
/// and restart it repairing; the other two elect a leader, asking the victim for votes,
/// which it refuses (`/admin/status`), and the victim ends byte-identical with them with
/// every history checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_by_a_read_while_running_is_repaired_by_the_watcher() {
    let seed = cluster::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Setup {
        mut cluster,
        alice,
        token,
        clients,
        chat,
    } = setup_with(
        Options {
            groups: 2,
            http: true,
            extra: vec!["--segment-mb".into(), "1".into()],
            capture: vec!["read found damage".into(), "corruption: log stopped".into()],
            ..Options::default()
        },
        "damage found by a read",
    )
    .await;
    let g = group_of(chat);
    let log = chatlog_raft::ids::raft_log(g).expect("a group log");
    let hist = history::History::default();
    let mut texts = Vec::new();
    for n in 0..400u64 {
        let body: String = (0..8192)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect();
        texts.push(format!("p:{n}:{body}"));
    }
    let post = |n: u64, text: String| post_recorded(&clients, &hist, chat, alice, n, text);
    let leader = current_leader(&cluster, g).await;
    let followers: Vec<u64> = cluster.ids().filter(|n| *n != leader).collect();
    let victim = followers[rng.random_range(0..followers.len())];
    eprintln!("seed {seed}: chat {chat} in group {g}: leader {leader}, victim {victim}");
    let mut next_post = 0u64;
    loop {
        for _ in 0..40 {
            post(next_post, texts[next_post as usize].clone()).await;
            next_post += 1;
        }
        let with_appends = segments_with_appends(&cluster.dir(victim), log)
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .count();
        if with_appends >= 2 {
            break;
        }
        assert!(next_post < 360, "no second segment on node {victim}");
    }
    let caught_up = |cluster: &Cluster| {
        let (l, v) = (cluster.http_addr(leader), cluster.http_addr(victim));
        async move {
            let want = group_json(&status(&l).await, g)["last_log_index"]
                .as_u64()
                .expect("leader's last index");
            let deadline = Instant::now() + WAIT;
            while group_json(&status(&v).await, g)["applied"]
                .as_u64()
                .unwrap_or(0)
                < want
            {
                assert!(Instant::now() < deadline, "node {victim} does not catch up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    caught_up(&cluster).await;
    // A checkpoint at the head, then a clean start: nothing reads the old entries.
    let r = request(
        &cluster.http_addr(victim),
        "POST",
        "/admin/snapshot",
        None,
        None,
        Duration::from_secs(60),
    )
    .await
    .expect("snapshot");
    assert_eq!(
        r.status,
        200,
        "snapshot: {}",
        String::from_utf8_lossy(&r.body)
    );
    cluster.kill(victim);
    tokio::task::block_in_place(|| cluster.restart(victim));
    caught_up(&cluster).await;
    // The victim leads the group.
    let deadline = Instant::now() + WAIT;
    while current_leader(&cluster, g).await != victim {
        assert!(
            Instant::now() < deadline,
            "node {victim} never leads group {g}"
        );
        let from = current_leader(&cluster, g).await;
        let body = format!("{{\"group\": {g}, \"to\": {victim}}}");
        let _ = request(
            &cluster.http_addr(from),
            "POST",
            "/admin/leader-transfer",
            None,
            Some(body.as_bytes()),
            Duration::from_secs(10),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused_before = status(&cluster.http_addr(victim)).await["votes_refused_while_repairing"]
        .as_u64()
        .unwrap_or(0);
    // Flip one byte of a record of the oldest segment, in place, while the node runs.
    let (path, recs) = segments_with_appends(&cluster.dir(victim), log)
        .into_iter()
        .find(|(_, r)| !r.is_empty())
        .expect("an older segment");
    let record = recs[recs.len() / 2];
    let at = record.offset + RECORD_HEADER_BYTES + (record.len - RECORD_HEADER_BYTES) / 2;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open segment");
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at as u64).expect("read byte");
        b[0] ^= 0x10;
        file.write_all_at(&b, at as u64).expect("flip byte");
        file.sync_all().expect("sync");
    }
    eprintln!(
        "flipped byte {at} of {} while node {victim} runs (record at {}, of {} holding \
         group {g}'s entries there)",
        path.display(),
        record.offset,
        recs.len()
    );
    // Read the chat's whole history through the victim.
    let client = &clients[(victim - 1) as usize];
    let mut from = 1u64;
    let mut read_error = None;
    for _ in 0..20 {
        match client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: from,
                direction: v1::Direction::Forward.into(),
                limit: 100,
            })
            .await
        {
            Ok(page) => {
                // s8retention: whatever a read answers is the text that was sent (a read
                // that hit the damage is UNAVAILABLE; the client's retry may then be
                // answered once the replica repaired, never with the damaged bytes).
                for e in &page.events {
                    if let Some(v1::event::Body::MessagePosted(m)) = &e.body
                        && let Some(n) = m
                            .text
                            .strip_prefix("p:")
                            .and_then(|t| t.split(':').next())
                            .and_then(|n| n.parse::<usize>().ok())
                    {
                        assert!(
                            m.text == texts[n],
                            "seq {} served other bytes than post {n} sent",
                            e.seq
                        );
                    }
                }
                from = page.events.last().map_or(from, |e| e.seq + 1);
                if !page.has_more {
                    break;
                }
            }
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
    }
    eprintln!("history read through node {victim}: error {read_error:?}, read to seq {from}");
    // s8retention: a read that hits the damage is UNAVAILABLE (retry; the replica repairs),
    // never INTERNAL.
    if let Some(e) = &read_error {
        assert!(
            e.contains("Unavailable") && !e.contains("Internal"),
            "the damaged read's error: {e}"
        );
    }
    // The watcher found it, stopped the replica and restarted it repairing.
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = cluster.captured(victim);
        if lines.iter().any(|l| l.contains("read found damage")) {
            for l in lines.iter().take(4) {
                eprintln!("node {victim}: {l}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watcher never restarted the damaged replica: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Either the read failed (UNAVAILABLE, above), or every event it served was checked
    // against what was sent (a retry answered after the repair).
    assert!(
        read_error.is_some() || from > 1,
        "the read through the damaged replica served nothing and no error"
    );
    // Another node leads; the victim repairs from it.
    let deadline = Instant::now() + WAIT;
    loop {
        let v = status(&cluster.http_addr(victim)).await;
        let gv = group_json(&v, g);
        if gv["repair"]["status"] == "sound" && gv["leader"].as_u64().is_some_and(|l| l != victim) {
            let refused = v["votes_refused_while_repairing"].as_u64().unwrap_or(0);
            eprintln!("victim repaired: votes refused {refused} (before {refused_before}), {gv}");
            assert!(
                refused > refused_before,
                "the others elected a leader while the victim repaired: it refused their votes"
            );
            break;
        }
        assert!(Instant::now() < deadline, "still repairing: {gv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in next_post..next_post + 5 {
        post(n, format!("after:{n}")).await;
    }
    assert_same_log_everywhere(&cluster, &token, chat, &hist, seed).await;
}
