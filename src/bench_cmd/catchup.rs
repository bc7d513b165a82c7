//! The `catchup` scenario: a device that is `--backlog` events (10,000 by default) behind
//! across `--chats` chats (100 by default) reconnects; how long from connect to fully
//! synced.
//!
//! What it owns: the device (a second login of the first bench user, a member of every
//! chat), posting the backlog evenly over the chats while the device is offline, and the
//! catch-up the way `chatlog sync` and an app do it through the client library: connect
//! with the session token, one `sync` with the device's position in every chat (at most
//! a page of events per chat), then, for every chat whose answer says `too_long`,
//! forward `history` pages from the last seq received, the chats in parallel; pages are
//! always the protocol's largest (`PAGE_ITEMS_MAX`, 100 events), as `chatlog sync`
//! asks by default. A round is
//! timed from before the TCP connect until the last event of the last chat is in hand;
//! every chat must then hold exactly its posted events, in seq order, once each.
//! What it must not do: count a round that missed or repeated an event as a success
//! (it counts `GAP`, `DUPLICATE` or `MISSING` instead), or run unbounded (`--rounds`,
//! and at most [`CATCHUP_PAGES_MAX`] history pages per chat).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use chatlog_wire::client::Client;
use chatlog_wire::limits::PAGE_ITEMS_MAX;
use chatlog_wire::proto::v1;
use serde_json::{Map, json};

use super::report::{self, Report, Stats, error_kind, histogram, latency_json};
use super::{BenchArgs, CLIENT_THREADS, World, options, setup_error};
use crate::cli::CliError;

/// Most history pages one chat's catch-up reads in a round.
pub const CATCHUP_PAGES_MAX: usize = 1_000;

/// Default `--backlog` of `catchup`: the 10,000 events behind.
pub const CATCHUP_BACKLOG_DEFAULT: u64 = 10_000;

/// Checks that `events` continue `pos` densely; the new position.
fn check_run(mut pos: u64, events: &[v1::Event]) -> Result<u64, &'static str> {
    for e in events {
        if e.seq <= pos {
            return Err("DUPLICATE");
        }
        if e.seq != pos + 1 {
            return Err("GAP");
        }
        pos = e.seq;
    }
    Ok(pos)
}

/// Posts `n` messages spread evenly over `chats` (message k to chat k mod chats) through
/// the connections, `in_flight` per connection; the highest seq acknowledged per chat.
async fn post_backlog(
    world: &World,
    chats: &[u64],
    n: u64,
    in_flight: usize,
    text: &str,
    stats: &mut Stats,
) -> HashMap<u64, u64> {
    let mut heads = HashMap::new();
    let mut pending = tokio::task::JoinSet::new();
    let limit = (world.conns.len() * in_flight).max(1);
    let mut k = 0u64;
    loop {
        while k < n && pending.len() < limit {
            let c = world.conns[(k as usize) % world.conns.len()].clone();
            let chat_id = chats[(k as usize) % chats.len()];
            let text = text.to_owned();
            pending.spawn(async move {
                let r = c
                    .send_message(v1::SendMessageRequest {
                        chat_id,
                        client_message_id: super::scenarios::next_client_id(),
                        text,
                        media: None,
                        reply_to_seq: 0,
                    })
                    .await;
                (chat_id, r)
            });
            k += 1;
        }
        match pending.join_next().await {
            Some(Ok((chat, Ok(sent)))) => {
                let h = heads.entry(chat).or_insert(0);
                *h = (*h).max(sent.seq);
            }
            Some(Ok((_, Err(e)))) => stats.error(error_kind(e)),
            Some(Err(_)) => stats.error("WORKER_FAILED"),
            None => break,
        }
    }
    heads
}

/// One catch-up: connect, sync, page what the sync left; the new positions, events
/// received, text bytes, requests made.
async fn catch_up(
    addr: &str,
    token: &str,
    positions: &BTreeMap<u64, u64>,
    page: u32,
) -> Result<(BTreeMap<u64, u64>, u64, u64, u64), String> {
    let client = Client::connect(addr, options(Some(token.to_owned()), 128))
        .await
        .map_err(error_kind)?;
    let mut out = positions.clone();
    let (mut events, mut bytes, mut requests) = (0u64, 0u64, 0u64);
    let mut behind = Vec::new();
    let wanted: Vec<v1::ChatPosition> = positions
        .iter()
        .map(|(&chat_id, &last_seq)| v1::ChatPosition { chat_id, last_seq })
        .collect();
    for chunk in wanted.chunks(PAGE_ITEMS_MAX as usize) {
        let r = client
            .sync(v1::SyncRequest {
                chats: chunk.to_vec(),
                events_per_chat_max: page,
                after_chat_id: 0,
            })
            .await
            .map_err(error_kind)?;
        requests += 1;
        for d in r.chats {
            if d.not_member {
                return Err("NOT_MEMBER".into());
            }
            let pos = out.get(&d.chat_id).copied().ok_or("UNASKED_CHAT")?;
            let new = check_run(pos, &d.events)?;
            events += d.events.len() as u64;
            bytes += d.events.iter().map(text_bytes).sum::<u64>();
            out.insert(d.chat_id, new);
            if d.too_long || new < d.head_seq {
                behind.push((d.chat_id, new, d.head_seq));
            }
        }
    }
    // Page the rest of every chat still behind, the chats in parallel.
    let mut tasks = tokio::task::JoinSet::new();
    for (chat_id, mut pos, head) in behind {
        let client = client.clone();
        tasks.spawn(async move {
            let (mut events, mut bytes, mut requests) = (0u64, 0u64, 0u64);
            for _ in 0..CATCHUP_PAGES_MAX {
                if pos >= head {
                    break;
                }
                let got = client
                    .history(v1::HistoryRequest {
                        chat_id,
                        from_seq: pos + 1,
                        direction: v1::Direction::Forward.into(),
                        limit: page,
                    })
                    .await
                    .map_err(error_kind)?;
                requests += 1;
                pos = check_run(pos, &got.events)?;
                events += got.events.len() as u64;
                bytes += got.events.iter().map(text_bytes).sum::<u64>();
                if got.events.is_empty() {
                    break;
                }
            }
            Ok::<_, String>((chat_id, pos, events, bytes, requests))
        });
    }
    while let Some(t) = tasks.join_next().await {
        let (chat_id, pos, e, b, r) = t.map_err(|_| "WORKER_FAILED".to_owned())??;
        out.insert(chat_id, pos);
        events += e;
        bytes += b;
        requests += r;
    }
    Ok((out, events, bytes, requests))
}

fn text_bytes(e: &v1::Event) -> u64 {
    match &e.body {
        Some(v1::event::Body::MessagePosted(m)) => m.text.len() as u64,
        _ => 0,
    }
}

/// Runs the catch-up scenario.
pub async fn catchup(args: &BenchArgs, world: &World, embedded: bool) -> Result<Report, CliError> {
    let backlog = args.backlog.unwrap_or(CATCHUP_BACKLOG_DEFAULT);
    // The device: a new login of the first user, who is a member of every chat.
    let user = &world.users[0];
    let device = Client::connect(&world.addr, options(None, 128))
        .await
        .map_err(|e| setup_error("connecting the device", e))?;
    let login = device
        .login(v1::LoginRequest {
            user_id: user.user_id,
            login_token: user.login_token.clone(),
            device_id: "bench-catchup".into(),
            device_name: "chatlog bench catchup".into(),
        })
        .await
        .map_err(|e| setup_error("logging the device in", e))?;
    let mut positions = BTreeMap::new();
    for &chat_id in &world.chats {
        let head = device
            .history(v1::HistoryRequest {
                chat_id,
                from_seq: 0,
                direction: v1::Direction::Backward.into(),
                limit: 1,
            })
            .await
            .map_err(|e| setup_error("reading the device's chats", e))?
            .head_seq;
        positions.insert(chat_id, head);
    }
    // Offline from here on.
    drop(device);
    let text: String = "c".repeat(args.size);
    let mut stats = Stats::default();
    let mut rounds = histogram();
    let (mut events_total, mut requests_total, mut secs_total, mut cpu_total) =
        (0u64, 0u64, 0.0f64, 0.0f64);
    let mut rounds_ok = 0u32;
    for _ in 0..args.rounds {
        let heads = post_backlog(
            world,
            &world.chats,
            backlog,
            args.in_flight,
            &text,
            &mut stats,
        )
        .await;
        let cpu0 = server_cpu(embedded);
        let started = Instant::now();
        let result = catch_up(
            &world.addr,
            &login.session_token,
            &positions,
            PAGE_ITEMS_MAX,
        )
        .await;
        let took = started.elapsed();
        if let (Some(a), Some(b)) = (cpu0, server_cpu(embedded)) {
            cpu_total += report::cpu_delta(a, b);
        }
        match result {
            Ok((new, events, bytes, requests)) => {
                let missing = world
                    .chats
                    .iter()
                    .filter(|c| heads.get(c).is_some_and(|&h| new.get(c).copied() < Some(h)))
                    .count() as u64;
                if missing > 0 {
                    *stats.errors.entry("MISSING".into()).or_default() += missing;
                }
                if events != backlog {
                    *stats.errors.entry("EVENT_COUNT".into()).or_default() += 1;
                }
                report::record(&mut rounds, took);
                report::record(&mut stats.all, took);
                events_total += events;
                requests_total += requests;
                stats.bytes += bytes;
                secs_total += took.as_secs_f64();
                positions = new;
                if missing == 0 && events == backlog {
                    rounds_ok += 1;
                }
            }
            Err(kind) => {
                stats.error(kind);
                // Resume from the heads next round: the device is resynced from scratch.
                for (chat, head) in heads {
                    positions.insert(chat, head);
                }
            }
        }
    }
    let mut extra = Map::new();
    extra.insert(
        "catchup".into(),
        json!({
            "rounds": args.rounds,
            "rounds_ok": rounds_ok,
            "chats": world.chats.len(),
            "backlog": backlog,
            "events": events_total,
            "requests": requests_total,
            "median_us": if rounds.is_empty() { 0 } else { rounds.value_at_quantile(0.5) },
            "catch_up_us": latency_json(&rounds),
            "events_per_sec": report::round2(if secs_total > 0.0 { events_total as f64 / secs_total } else { 0.0 }),
        }),
    );
    Ok(Report {
        scenario: "catchup",
        config: Map::new(),
        command: String::new(),
        ops: events_total,
        ops_of: "events caught up",
        latency_of: "one round: connect to fully synced",
        bytes: stats.bytes,
        measured_secs: secs_total,
        warmup_note: "not used: only the catch-up of each round is timed (posting is not)"
            .to_owned(),
        errors: stats.errors.clone(),
        by_kind: Default::default(),
        extra,
        server: embedded.then(|| {
            json!({
                "cpu_secs": report::round3(cpu_total),
                "cpu_cores": report::round3(if secs_total > 0.0 { cpu_total / secs_total } else { 0.0 }),
                "rss_bytes": report::rss_bytes().unwrap_or(0),
            })
        }),
        latency: stats.all,
    })
}

fn server_cpu(embedded: bool) -> Option<f64> {
    embedded
        .then(|| report::server_cpu_secs(CLIENT_THREADS))
        .flatten()
}
