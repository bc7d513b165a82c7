//! The request loops of each scenario. Every loop is bounded: workers stop at the plan's
//! deadline or count, page loops at a fixed number of pages, waits at a grace period.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_wire::client::{Client, PushItem};
use chatlog_wire::proto::v1;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use super::dist::{ChatPicker, Distribution, Mix, OpKind};
use super::report::{self, Live, Progress, Report, Stats, error_kind, histogram, latency_json};
use super::{BenchArgs, CLIENT_THREADS, World, login};
use crate::cli::CliError;

/// Bytes at the start of a fanout or subscribe message that carry its intended send time (µs since
/// the run's base instant, 16 hex digits).
pub const STAMP_BYTES: usize = 16;

/// Most history pages one sync operation reads before it stops (it resumes from there
/// the next time).
const SYNC_PAGES_MAX: usize = 1_000;

/// How long subscribe waits, after the last post, for pushes still on their way.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);

/// Client message ids: unique in this process, so unique per sender and chat.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// A client message id unique in this process.
pub fn next_client_id() -> u64 {
    NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed)
}

/// When operations start and when the run stops.
#[derive(Debug)]
struct Plan {
    t0: Instant,
    warm_end: Instant,
    deadline: Instant,
    count: Option<u64>,
    rate: Option<f64>,
    /// Operations handed out (open loop: the index into the schedule).
    next: AtomicU64,
    /// Measured operations handed out, against `count`.
    measured: AtomicU64,
}

impl Plan {
    fn new(warmup: f64, duration: f64, count: Option<u64>, rate: Option<f64>) -> Plan {
        let t0 = Instant::now();
        let warm_end = t0 + Duration::from_secs_f64(warmup);
        Plan {
            t0,
            warm_end,
            deadline: warm_end + Duration::from_secs_f64(duration),
            count,
            rate,
            next: AtomicU64::new(0),
            measured: AtomicU64::new(0),
        }
    }

    /// The next operation's intended start and whether it is warm-up; `None` when the
    /// run is over. Open loop: waits until the intended start.
    async fn next(&self) -> Option<(Instant, bool)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let start = match self.rate {
            Some(rate) => {
                let at = self.t0 + Duration::from_secs_f64(i as f64 / rate);
                if at >= self.deadline {
                    return None;
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => {
                let now = Instant::now();
                if now >= self.deadline {
                    return None;
                }
                now
            }
        };
        let warm = start < self.warm_end;
        if !warm
            && let Some(count) = self.count
            && self.measured.fetch_add(1, Ordering::Relaxed) >= count
        {
            return None;
        }
        Some((start, warm))
    }
}

/// CPU seconds of the embedded server so far, when embedded.
fn server_cpu(embedded: bool) -> Option<f64> {
    embedded
        .then(|| report::server_cpu_secs(CLIENT_THREADS))
        .flatten()
}

fn server_json(cpu_secs: Option<f64>, measured_secs: f64) -> Option<Value> {
    let cpu = cpu_secs?;
    Some(json!({
        "cpu_secs": report::round3(cpu),
        "cpu_cores": report::round3(if measured_secs > 0.0 { cpu / measured_secs } else { 0.0 }),
        "rss_bytes": report::rss_bytes().unwrap_or(0),
    }))
}

/// Message text bytes of an event (0 for events without text).
fn text_bytes(e: &v1::Event) -> u64 {
    match &e.body {
        Some(v1::event::Body::MessagePosted(m)) => m.text.len() as u64,
        _ => 0,
    }
}

/// Random lowercase text of `size` bytes.
fn random_text(rng: &mut impl Rng, size: usize) -> String {
    (0..size)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// One caller: one request in flight on a shared connection.
#[derive(Debug)]
struct Worker {
    client: Client,
    rng: StdRng,
    picker: Arc<ChatPicker>,
    chats: Arc<Vec<u64>>,
    text: String,
    page: u32,
    mix: Option<Mix>,
    /// sync: the last seq this caller has seen, per chat.
    positions: HashMap<u64, u64>,
    /// subscribe: messages carry their intended start relative to this.
    stamp_base: Option<Instant>,
    live: Arc<Live>,
}

/// What a successful operation moved.
#[derive(Debug, Default)]
struct Moved {
    bytes: u64,
    events: u64,
    /// send: (chat, seq) acknowledged.
    acked: Option<(u64, u64)>,
}

impl Worker {
    async fn run(mut self, plan: Arc<Plan>) -> Stats {
        let mut stats = Stats::default();
        while let Some((start, warm)) = plan.next().await {
            let kind = match &self.mix {
                Some(mix) => mix.pick(&mut self.rng),
                None => OpKind::Send,
            };
            let result = match kind {
                OpKind::Send => self.send(start).await,
                OpKind::History => self.history().await,
                OpKind::Sync => self.sync().await,
            };
            let latency = start.elapsed();
            self.live.ops.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(moved) => {
                    if let Some((chat, seq)) = moved.acked {
                        stats.sends_acked += 1;
                        let max = stats.acked.entry(chat).or_default();
                        *max = (*max).max(seq);
                    }
                    if !warm {
                        stats.op(kind, latency);
                        stats.bytes += moved.bytes;
                        stats.events += moved.events;
                    }
                }
                Err(kind) => {
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    stats.error(kind);
                }
            }
        }
        stats
    }

    fn chat(&mut self) -> u64 {
        self.chats[self.picker.pick(&mut self.rng)]
    }

    async fn send(&mut self, start: Instant) -> Result<Moved, String> {
        let chat_id = self.chat();
        let text = match self.stamp_base {
            Some(base) => {
                let us = start.saturating_duration_since(base).as_micros() as u64;
                format!("{us:016x}{}", &self.text[STAMP_BYTES..])
            }
            None => self.text.clone(),
        };
        let sent = self
            .client
            .send_message(v1::SendMessageRequest {
                chat_id,
                client_message_id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
                text,
                media: None,
                reply_to_seq: 0,
            })
            .await
            .map_err(error_kind)?;
        if sent.deduplicated {
            return Err("DEDUPLICATED".into());
        }
        Ok(Moved {
            bytes: self.text.len() as u64,
            events: 0,
            acked: Some((chat_id, sent.seq)),
        })
    }

    /// The newest page of a chat.
    async fn history(&mut self) -> Result<Moved, String> {
        let chat_id = self.chat();
        let page = self
            .client
            .history(v1::HistoryRequest {
                chat_id,
                from_seq: 0,
                direction: v1::Direction::Backward.into(),
                limit: self.page,
            })
            .await
            .map_err(error_kind)?;
        Ok(Moved {
            bytes: page.events.iter().map(text_bytes).sum(),
            events: page.events.len() as u64,
            acked: None,
        })
    }

    /// Catches one chat up from this caller's last seq (the newest page the first time).
    async fn sync(&mut self) -> Result<Moved, String> {
        let chat_id = self.chat();
        let mut moved = Moved::default();
        let Some(&pos) = self.positions.get(&chat_id) else {
            let page = self
                .client
                .history(v1::HistoryRequest {
                    chat_id,
                    from_seq: 0,
                    direction: v1::Direction::Backward.into(),
                    limit: self.page,
                })
                .await
                .map_err(error_kind)?;
            let first = page.events.first().map_or(page.head_seq, |e| e.seq - 1);
            let last = check_run(first, &page.events)?;
            moved.bytes = page.events.iter().map(text_bytes).sum();
            moved.events = page.events.len() as u64;
            self.positions.insert(chat_id, last.max(page.head_seq));
            return Ok(moved);
        };
        let (last, bytes, events) = catch_up(&self.client, chat_id, pos, self.page).await;
        self.positions.insert(chat_id, last?);
        moved.bytes = bytes;
        moved.events = events;
        Ok(moved)
    }
}

/// Checks that `events` are exactly `pos + 1, pos + 2, …`; the last seq.
fn check_run(mut pos: u64, events: &[v1::Event]) -> Result<u64, String> {
    for e in events {
        if e.seq <= pos {
            return Err("DUPLICATE".into());
        }
        if e.seq != pos + 1 {
            return Err("GAP".into());
        }
        pos = e.seq;
    }
    Ok(pos)
}

/// Reads a chat forward from `pos + 1` until its head (at most [`SYNC_PAGES_MAX`]
/// pages): the new position (or the error that stopped it), text bytes and events read.
async fn catch_up(
    client: &Client,
    chat_id: u64,
    mut pos: u64,
    page: u32,
) -> (Result<u64, String>, u64, u64) {
    let (mut bytes, mut events) = (0, 0);
    for _ in 0..SYNC_PAGES_MAX {
        let got = match client
            .history(v1::HistoryRequest {
                chat_id,
                from_seq: pos + 1,
                direction: v1::Direction::Forward.into(),
                limit: page,
            })
            .await
        {
            Ok(got) => got,
            Err(e) => return (Err(error_kind(e)), bytes, events),
        };
        pos = match check_run(pos, &got.events) {
            Ok(p) => p,
            Err(e) => return (Err(e), bytes, events),
        };
        bytes += got.events.iter().map(text_bytes).sum::<u64>();
        events += got.events.len() as u64;
        if !got.has_more || got.events.is_empty() {
            break;
        }
    }
    (Ok(pos), bytes, events)
}

/// Starts `in_flight` workers on each connection; their merged stats.
#[allow(clippy::too_many_arguments)]
async fn run_workers(
    args: &BenchArgs,
    world: &World,
    plan: &Arc<Plan>,
    chats: &[u64],
    distribution: Distribution,
    mix: Option<Mix>,
    stamp_base: Option<Instant>,
    live: &Arc<Live>,
) -> Stats {
    let picker = Arc::new(ChatPicker::new(chats.len(), distribution));
    let chats = Arc::new(chats.to_vec());
    let mut seeder = StdRng::seed_from_u64(args.seed);
    let mut tasks = Vec::new();
    for client in &world.conns {
        for _ in 0..args.in_flight {
            let mut rng = StdRng::seed_from_u64(seeder.random());
            let text = random_text(&mut rng, args.size);
            let worker = Worker {
                client: client.clone(),
                rng,
                picker: Arc::clone(&picker),
                chats: Arc::clone(&chats),
                text,
                page: args.page,
                mix: mix.clone(),
                positions: HashMap::new(),
                stamp_base,
                live: Arc::clone(live),
            };
            tasks.push(tokio::spawn(worker.run(Arc::clone(plan))));
        }
    }
    let mut stats = Stats::default();
    for task in tasks {
        match task.await {
            Ok(s) => stats.merge(s),
            Err(_) => stats.error("WORKER_FAILED"),
        }
    }
    stats
}

fn warmup_note(args: &BenchArgs) -> String {
    format!(
        "{} s excluded (operations started before it ran but are in no figure; errors count)",
        args.warmup
    )
}

/// `send`, and `mixed` when `mixed`.
pub async fn send_or_mixed(args: &BenchArgs, world: &World, mixed: bool, embedded: bool) -> Report {
    let live = Arc::new(Live::default());
    let progress = Progress::start(if mixed { "mixed" } else { "send" }, Arc::clone(&live));
    let plan = Arc::new(Plan::new(args.warmup, args.duration, args.count, args.rate));
    let warm_end = plan.warm_end;
    let cpu_at_warm_end = tokio::spawn(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        server_cpu(embedded)
    });
    let mix = mixed.then(|| args.mix.clone());
    let stats = run_workers(
        args,
        world,
        &plan,
        &world.chats,
        args.distribution,
        mix,
        None,
        &live,
    )
    .await;
    let end = Instant::now();
    let cpu_end = server_cpu(embedded);
    progress.finish();
    let measured_secs = end.saturating_duration_since(warm_end).as_secs_f64();
    let cpu_start = cpu_at_warm_end.await.ok().flatten();
    let cpu = cpu_end.zip(cpu_start).map(|(b, a)| report::cpu_delta(a, b));
    let mut extra = Map::new();
    if mixed {
        extra.insert("events_read".into(), json!(stats.events));
    }
    Report {
        scenario: if mixed { "mixed" } else { "send" },
        config: Map::new(),
        command: String::new(),
        ops: stats.all.len(),
        ops_of: if mixed { "operations" } else { "sends" },
        latency_of: if args.rate.is_some() {
            "intended start to response"
        } else {
            "request to response"
        },
        bytes: stats.bytes,
        measured_secs,
        warmup_note: warmup_note(args),
        errors: stats.errors.clone(),
        by_kind: if mixed {
            stats.by_kind.clone()
        } else {
            BTreeMap::new()
        },
        extra,
        server: server_json(cpu, measured_secs),
        latency: stats.all,
    }
}

/// A device of the sync scenario.
#[derive(Debug)]
struct Device {
    client: Client,
    chat: u64,
    pos: u64,
}

/// `sync`: devices go offline while the connections post, then catch up.
pub async fn sync(args: &BenchArgs, world: &World, embedded: bool) -> Result<Report, CliError> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let live = Arc::new(Live::default());
    let mut devices = Vec::with_capacity(args.devices);
    for d in 0..args.devices {
        let user = &world.users[d % world.users.len()];
        let client = login(&world.addr, user, &format!("bench-dev-{d}"), 4)
            .await
            .map_err(|e| super::setup_error("logging a device in", e))?;
        let chat = world.chats[d % world.chats.len()];
        let head = client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: 0,
                direction: v1::Direction::Backward.into(),
                limit: 1,
            })
            .await
            .map_err(|e| super::setup_error("reading a device's chat", e))?
            .head_seq;
        devices.push(Device {
            client,
            chat,
            pos: head,
        });
    }
    let mut device_chats: Vec<u64> = devices.iter().map(|d| d.chat).collect();
    device_chats.sort_unstable();
    device_chats.dedup();

    let progress = Progress::start("sync", Arc::clone(&live));
    let mut stats = Stats::default();
    let mut catch_up_ms = histogram();
    let (mut catch_up_secs, mut cpu, mut rounds_done) = (0.0, 0.0, 0u32);
    for _ in 0..args.rounds {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Offline: the connections post the backlog to the devices' chats.
        let plan = Arc::new(Plan::new(
            0.0,
            left.as_secs_f64(),
            Some(args.backlog.unwrap_or(2_000)),
            None,
        ));
        let posted = run_workers(
            args,
            world,
            &plan,
            &device_chats,
            args.distribution,
            None,
            None,
            &live,
        )
        .await;
        for (k, n) in &posted.errors {
            *stats.errors.entry(k.clone()).or_default() += n;
        }
        // Online: every device catches up at once.
        let cpu0 = server_cpu(embedded);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for mut device in devices.drain(..) {
            let page = args.page;
            let live = Arc::clone(&live);
            tasks.push(tokio::spawn(async move {
                let mut s = Stats::default();
                let t = Instant::now();
                let mut pos = device.pos;
                for _ in 0..SYNC_PAGES_MAX {
                    let asked = Instant::now();
                    let got = device
                        .client
                        .history(v1::HistoryRequest {
                            chat_id: device.chat,
                            from_seq: pos + 1,
                            direction: v1::Direction::Forward.into(),
                            limit: page,
                        })
                        .await;
                    live.ops.fetch_add(1, Ordering::Relaxed);
                    let got = match got {
                        Ok(got) => got,
                        Err(e) => {
                            live.errors.fetch_add(1, Ordering::Relaxed);
                            s.error(error_kind(e));
                            break;
                        }
                    };
                    report::record(&mut s.all, asked.elapsed());
                    match check_run(pos, &got.events) {
                        Ok(p) => pos = p,
                        Err(kind) => {
                            live.errors.fetch_add(1, Ordering::Relaxed);
                            s.error(kind);
                            break;
                        }
                    }
                    s.bytes += got.events.iter().map(text_bytes).sum::<u64>();
                    s.events += got.events.len() as u64;
                    if !got.has_more || got.events.is_empty() {
                        break;
                    }
                }
                device.pos = pos;
                (device, s, t.elapsed())
            }));
        }
        for task in tasks {
            match task.await {
                Ok((device, s, took)) => {
                    report::record(&mut catch_up_ms, took);
                    stats.merge(s);
                    devices.push(device);
                }
                Err(_) => stats.error("WORKER_FAILED"),
            }
        }
        catch_up_secs += started.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (cpu0, server_cpu(embedded)) {
            cpu += report::cpu_delta(a, b);
        }
        rounds_done += 1;
        // Every acknowledged post must have reached the devices of its chat.
        for device in &devices {
            if posted
                .acked
                .get(&device.chat)
                .is_some_and(|&seq| device.pos < seq)
            {
                stats.error("MISSING");
            }
        }
    }
    progress.finish();
    let mut extra = Map::new();
    extra.insert(
        "sync".into(),
        json!({
            "rounds": rounds_done,
            "devices": args.devices,
            "events": stats.events,
            "events_per_sec": report::round2(if catch_up_secs > 0.0 { stats.events as f64 / catch_up_secs } else { 0.0 }),
            "catch_up_us": latency_json(&catch_up_ms),
        }),
    );
    Ok(Report {
        scenario: "sync",
        config: Map::new(),
        command: String::new(),
        ops: stats.events,
        ops_of: "events caught up",
        latency_of: "one history page",
        bytes: stats.bytes,
        measured_secs: catch_up_secs,
        warmup_note: "not used: only the catch-up phases are timed (posting the backlog is not)"
            .to_owned(),
        errors: stats.errors.clone(),
        by_kind: BTreeMap::new(),
        extra,
        server: embedded
            .then(|| server_json(Some(cpu), catch_up_secs))
            .flatten(),
        latency: stats.all,
    })
}

/// `subscribe`: subscribers on every chat, posts timed to their subscriptions' pushes.
pub async fn subscribe(
    args: &BenchArgs,
    world: &World,
    embedded: bool,
) -> Result<Report, CliError> {
    let base = Instant::now();
    let live = Arc::new(Live::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    // Set once the plan exists; pushes timed before it are warm-up.
    let warm_end_us = Arc::new(AtomicU64::new(u64::MAX));
    for s in 0..args.subscribers {
        let user = &world.users[s % world.users.len()];
        let client = login(
            &world.addr,
            user,
            &format!("bench-sub-{s}"),
            world.chats.len() + 8,
        )
        .await
        .map_err(|e| super::setup_error("logging a subscriber in", e))?;
        let Some(mut pushes) = client.pushes() else {
            return Err("setup: the subscriber's pushes were taken".into());
        };
        let mut next_seq: HashMap<u64, u64> = HashMap::new();
        for &chat in &world.chats {
            let (id, sub) = client
                .subscribe_with_id(v1::SubscribeRequest {
                    chat_id: chat,
                    from_seq: 0,
                })
                .await
                .map_err(|e| super::setup_error("subscribing", e))?;
            next_seq.insert(id, sub.head_seq + 1);
        }
        let mut stopped = stopped.clone();
        let delivered = Arc::clone(&delivered);
        let warm_end_us = Arc::clone(&warm_end_us);
        let live = Arc::clone(&live);
        receivers.push(tokio::spawn(async move {
            // Keeps the connection (and so the subscriptions) alive.
            let _client = client;
            let mut s = Stats::default();
            loop {
                let item = tokio::select! {
                    item = pushes.recv() => item,
                    _ = stopped.wait_for(|v| *v) => break,
                };
                let now_us = base.elapsed().as_micros() as u64;
                match item {
                    Some(PushItem::Push {
                        request_id,
                        push: v1::push::Kind::ChatEvents(events),
                    }) => {
                        let Some(next) = next_seq.get_mut(&request_id) else {
                            continue;
                        };
                        match check_run(*next - 1, &events.events) {
                            Ok(last) => *next = last + 1,
                            Err(kind) => {
                                live.errors.fetch_add(1, Ordering::Relaxed);
                                s.error(kind);
                            }
                        }
                        for e in &events.events {
                            let Some(v1::event::Body::MessagePosted(m)) = &e.body else {
                                continue;
                            };
                            let Some(sent_us) = m
                                .text
                                .get(..STAMP_BYTES)
                                .and_then(|h| u64::from_str_radix(h, 16).ok())
                            else {
                                continue;
                            };
                            delivered.fetch_add(1, Ordering::Relaxed);
                            if sent_us >= warm_end_us.load(Ordering::Relaxed) {
                                report::record(
                                    &mut s.all,
                                    Duration::from_micros(now_us.saturating_sub(sent_us)),
                                );
                                s.bytes += m.text.len() as u64;
                            }
                        }
                    }
                    Some(PushItem::Push {
                        push: v1::push::Kind::SubscriptionEnded(_),
                        ..
                    }) => {
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        s.error("SUBSCRIPTION_ENDED");
                    }
                    Some(PushItem::Push { .. }) => {}
                    Some(PushItem::Lagged { .. }) => {
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        s.error("LAGGED");
                    }
                    Some(PushItem::ConnectionLost) | None => {
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        s.error("CONNECTION_LOST");
                        break;
                    }
                }
            }
            s
        }));
    }

    let progress = Progress::start("subscribe", Arc::clone(&live));
    let plan = Arc::new(Plan::new(args.warmup, args.duration, args.count, args.rate));
    let warm_end = plan.warm_end;
    warm_end_us.store(
        warm_end.saturating_duration_since(base).as_micros() as u64,
        Ordering::Relaxed,
    );
    let cpu_at_warm_end = tokio::spawn(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        server_cpu(embedded)
    });
    let posts = run_workers(
        args,
        world,
        &plan,
        &world.chats,
        args.distribution,
        None,
        Some(base),
        &live,
    )
    .await;
    // Wait (bounded) for the pushes of every acknowledged post.
    let expected = posts.sends_acked * args.subscribers as u64;
    let grace_end = Instant::now() + DELIVERY_GRACE;
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = Instant::now();
    let cpu_end = server_cpu(embedded);
    let _ = stop.send(true);
    let mut stats = Stats::default();
    for r in receivers {
        match r.await {
            Ok(s) => stats.merge(s),
            Err(_) => stats.error("WORKER_FAILED"),
        }
    }
    progress.finish();
    for (k, n) in &posts.errors {
        *stats.errors.entry(k.clone()).or_default() += n;
    }
    let got = delivered.load(Ordering::Relaxed);
    if got < expected {
        *stats.errors.entry("NOT_DELIVERED".into()).or_default() += expected - got;
    }
    let measured_secs = end.saturating_duration_since(warm_end).as_secs_f64();
    let cpu_start = cpu_at_warm_end.await.ok().flatten();
    let cpu = cpu_end.zip(cpu_start).map(|(b, a)| report::cpu_delta(a, b));
    let mut extra = Map::new();
    extra.insert(
        "subscribe".into(),
        json!({
            "subscribers": args.subscribers,
            "subscriptions": args.subscribers * world.chats.len(),
            "posts": posts.all.len(),
            "posts_per_sec": report::round2(if measured_secs > 0.0 { posts.all.len() as f64 / measured_secs } else { 0.0 }),
            "post_latency_us": latency_json(&posts.all),
            "deliveries_expected": expected,
            "deliveries": got,
        }),
    );
    Ok(Report {
        scenario: "subscribe",
        config: Map::new(),
        command: String::new(),
        ops: stats.all.len(),
        ops_of: "pushes delivered",
        latency_of: "post's start to push arrival",
        bytes: stats.bytes,
        measured_secs,
        warmup_note: warmup_note(args),
        errors: stats.errors.clone(),
        by_kind: BTreeMap::new(),
        extra,
        server: server_json(cpu, measured_secs),
        latency: stats.all,
    })
}
