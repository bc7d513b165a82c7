//! The `fanout` scenario: one channel, `--online` subscriber connections on one server
//! (15,000 by default, of `--members` members), one poster posting every
//! `--post-interval-ms`; delivery latency to every subscriber's socket and deliveries/s.
//!
//! What it owns: creating the channel and its members, spreading the subscriber
//! connections over `--workers` child processes (each re-executes this binary as the
//! hidden `chatlog bench fanout-worker` and holds its share of the sockets, since one
//! process may hold at most 20,000 open files here), the poster, and merging what the
//! workers measured. What it must not do: trust a count it did not check (every
//! subscriber's pushes are checked for gaps and duplicates, and a subscriber counts as
//! complete only with every post exactly once, in seq order), or leave a worker running
//! (workers are killed on drop and exit when their stdin closes).
//!
//! Times: every timestamp is `CLOCK_MONOTONIC` in µs ([`mono_us`]), one clock for every
//! process on the machine, so a worker compares a push's arrival with the poster's
//! times directly. The poster writes its send time into the first [`STAMP_BYTES`] of the
//! text; it also records each post's acknowledgement (the commit: the server answers a
//! send only after the entry is durable on a majority and applied). Reported are the
//! delivery latency from the send stamp (an upper bound on "from commit": it includes
//! the commit itself, which `post_ack_us` shows separately) and, per post, the time from
//! its acknowledgement to its *last* subscriber's arrival (`last_after_ack_us`; 0 when
//! every push arrived before the acknowledgement did).
//!
//! Worker protocol (one JSON object per line): parent → worker stdin `WorkerConfig`;
//! worker → stdout `{"ready": N, "errors": {..}}` once its subscribers are logged in;
//! parent → `{"go": {"warm_end_us": T}}`; parent → `{"stop": {"first_seq", "last_seq",
//! "grace_ms"}}` when every post is acknowledged; worker → its `WorkerReport` and exit.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chatlog_wire::client::Client;
use chatlog_wire::frame::{FrameReader, decode_message, encode_message};
use chatlog_wire::limits::{FRAME_BYTES_MAX, PAGE_ITEMS_MAX, PROTOCOL_VERSION};
use chatlog_wire::proto::v1::{self, frame, push, request, response};
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio::net::tcp::OwnedWriteHalf;

use super::report::{self, Report, histogram, latency_json};
use super::scenarios::STAMP_BYTES;
use super::{BenchArgs, CLIENT_NAME, CLIENT_THREADS, options, setup_error};
use crate::cli::CliError;

/// Most subscriber connections one worker process holds. Why: a process may hold at most
/// 20,000 open files on the machines this runs on; 5,000 sockets leave room and keep one
/// worker's receive loop within one core's reach.
pub const WORKER_CONNECTIONS_MAX: usize = 5_000;

/// Most subscriber processes. Why: each is a tokio runtime with its own threads on a
/// machine of a few cores; more only adds scheduling.
pub const WORKERS_MAX: usize = 64;

/// Most online subscribers of one run (the figure is 15,000).
pub const ONLINE_MAX: usize = 200_000;

/// Most channel members of one run (the largest group is 200,000).
pub const MEMBERS_MAX: usize = 1_000_000;

/// Subscribers a worker logs in at once.
const LOGIN_CONCURRENCY: usize = 128;

/// Users created (and invited) at once by the parent during setup.
const SETUP_IN_FLIGHT: usize = 256;

/// How often an idle subscriber pings: well inside the gateway's 60 s idle timeout.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(20);

/// How long the parent waits for a worker's answer to a step (ready, final report).
const WORKER_STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// How long workers wait, after the last post is acknowledged, for its pushes.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

/// `CLOCK_MONOTONIC` in µs: the same clock in every process of the machine.
pub fn mono_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer given, which is valid.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Raises this process's soft limit on open files to its hard limit; the new soft limit.
pub fn raise_open_files_limit() -> u64 {
    crate::gateway::raise_open_files_limit()
}

/// What a worker is given on stdin.
#[derive(Debug)]
struct WorkerConfig {
    addr: String,
    chat_id: u64,
    /// The address the worker's sockets connect from (127.0.0.x), so that many
    /// connections do not share one source address's ephemeral ports.
    source_ip: Ipv4Addr,
    /// (user id, dev-mode login token) of each subscriber this worker holds.
    users: Vec<(u64, String)>,
}

impl WorkerConfig {
    fn to_json(&self) -> Value {
        json!({"addr": self.addr, "chat_id": self.chat_id,
               "source_ip": self.source_ip.to_string(), "users": self.users})
    }

    fn from_json(v: &Value) -> Option<WorkerConfig> {
        let users = v["users"]
            .as_array()?
            .iter()
            .map(|u| Some((u[0].as_u64()?, u[1].as_str()?.to_owned())))
            .collect::<Option<Vec<_>>>()?;
        Some(WorkerConfig {
            addr: v["addr"].as_str()?.to_owned(),
            chat_id: v["chat_id"].as_u64()?,
            source_ip: v["source_ip"].as_str()?.parse().ok()?,
            users,
        })
    }
}

/// A worker's final answer.
#[derive(Debug, Default)]
struct WorkerReport {
    subscribers: u64,
    /// Subscribers that received every post of the range, exactly once, in order.
    complete: u64,
    /// Posts of the range received, over all subscribers.
    deliveries: u64,
    /// Failures by kind (GAP, DUPLICATE, DISCONNECTED, …).
    errors: BTreeMap<String, u64>,
    /// Delivery latency from the send stamp, µs, of measured posts: (value, count).
    delivery_us: Vec<(u64, u64)>,
    /// Per post: (seq, deliveries, latest arrival, send stamp), times in µs of
    /// [`mono_us`].
    per_post: Vec<(u64, u64, u64, u64)>,
    /// Peak resident memory of the worker, bytes.
    rss_bytes: u64,
}

impl WorkerReport {
    fn to_json(&self) -> Value {
        json!({"subscribers": self.subscribers, "complete": self.complete,
               "deliveries": self.deliveries, "errors": self.errors,
               "delivery_us": self.delivery_us, "per_post": self.per_post,
               "rss_bytes": self.rss_bytes})
    }

    fn from_json(v: &Value) -> Option<WorkerReport> {
        let pairs = |v: &Value| -> Option<Vec<(u64, u64)>> {
            v.as_array()?
                .iter()
                .map(|p| Some((p[0].as_u64()?, p[1].as_u64()?)))
                .collect()
        };
        Some(WorkerReport {
            subscribers: v["subscribers"].as_u64()?,
            complete: v["complete"].as_u64()?,
            deliveries: v["deliveries"].as_u64()?,
            errors: v["errors"]
                .as_object()?
                .iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect(),
            delivery_us: pairs(&v["delivery_us"])?,
            per_post: v["per_post"]
                .as_array()?
                .iter()
                .map(|p| {
                    Some((
                        p[0].as_u64()?,
                        p[1].as_u64()?,
                        p[2].as_u64()?,
                        p[3].as_u64()?,
                    ))
                })
                .collect::<Option<Vec<_>>>()?,
            rss_bytes: v["rss_bytes"].as_u64().unwrap_or(0),
        })
    }
}

/// What the subscribers of one worker have measured so far.
#[derive(Debug)]
struct Agg {
    delivery: Histogram<u64>,
    /// seq → (deliveries, latest arrival µs, send stamp µs).
    per_post: HashMap<u64, (u64, u64, u64)>,
}

/// Runs the hidden `fanout-worker`: reads its config from stdin, answers on stdout.
pub fn worker_main() -> Result<(), CliError> {
    raise_open_files_limit();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut next_line = move || -> Result<Value, CliError> {
        let line = lines
            .next()
            .ok_or("fanout-worker: stdin closed")?
            .map_err(|e| format!("fanout-worker: reading stdin: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("fanout-worker: bad input: {e}").into())
    };
    let config = WorkerConfig::from_json(&next_line()?).ok_or("fanout-worker: bad config")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()?;
    let agg = Arc::new(Mutex::new(Agg {
        delivery: histogram(),
        per_post: HashMap::new(),
    }));
    let (control, control_rx) = tokio::sync::watch::channel(Control::default());
    let done = Arc::new(AtomicU64::new(0));
    let (subs, errors) = rt.block_on(connect_all(&config, &agg, &control_rx, &done));
    let say = |v: Value| -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{v}")?;
        out.flush()?;
        Ok(())
    };
    say(json!({"ready": subs.len(), "errors": errors}))?;
    let mut report = WorkerReport {
        subscribers: subs.len() as u64,
        errors,
        ..Default::default()
    };
    loop {
        let msg = next_line()?;
        if let Some(go) = msg.get("go") {
            let warm_end_us = go["warm_end_us"].as_u64().unwrap_or(0);
            control.send_modify(|c| c.warm_end_us = warm_end_us);
        } else if let Some(stop) = msg.get("stop") {
            let first = stop["first_seq"].as_u64().unwrap_or(1);
            let last = stop["last_seq"].as_u64().unwrap_or(0);
            let grace = Duration::from_millis(stop["grace_ms"].as_u64().unwrap_or(10_000));
            control.send_modify(|c| c.range = Some((first, last)));
            let total = subs.len() as u64;
            rt.block_on(async {
                let end = tokio::time::Instant::now() + grace;
                while done.load(Ordering::Relaxed) < total && tokio::time::Instant::now() < end {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            control.send_modify(|c| c.stop = true);
            for sub in subs {
                match rt.block_on(sub) {
                    Ok(s) => {
                        report.deliveries += s.in_range;
                        if s.complete(first, last) {
                            report.complete += 1;
                        }
                        for (k, n) in s.errors {
                            *report.errors.entry(k).or_default() += n;
                        }
                    }
                    Err(_) => *report.errors.entry("WORKER_FAILED".into()).or_default() += 1,
                }
            }
            break;
        }
    }
    let agg = agg.lock().unwrap_or_else(|p| p.into_inner());
    report.delivery_us = agg
        .delivery
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    report.per_post = agg
        .per_post
        .iter()
        .map(|(seq, (n, at, stamp))| (*seq, *n, *at, *stamp))
        .collect();
    report.rss_bytes = report::rss_bytes().unwrap_or(0);
    say(report.to_json())?;
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// What the parent has told the worker so far.
#[derive(Debug, Default, Clone)]
struct Control {
    warm_end_us: u64,
    /// The posts' seq range, once every post is acknowledged.
    range: Option<(u64, u64)>,
    stop: bool,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct SubStats {
    /// Posts received (message events); checked for order as they come.
    last_seq: u64,
    first_post_seq: u64,
    in_range: u64,
    errors: BTreeMap<String, u64>,
}

impl SubStats {
    fn complete(&self, first: u64, last: u64) -> bool {
        self.errors.is_empty() && self.first_post_seq <= first && self.in_range == last + 1 - first
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }
}

/// Connects and logs in every subscriber of the worker; their reader tasks.
async fn connect_all(
    config: &WorkerConfig,
    agg: &Arc<Mutex<Agg>>,
    control: &tokio::sync::watch::Receiver<Control>,
    done: &Arc<AtomicU64>,
) -> (
    Vec<tokio::task::JoinHandle<SubStats>>,
    BTreeMap<String, u64>,
) {
    let addr: SocketAddr = match tokio::net::lookup_host(&config.addr).await {
        Ok(mut a) => match a.next() {
            Some(a) => a,
            None => return (Vec::new(), BTreeMap::from([("CONNECT".into(), 1)])),
        },
        Err(_) => return (Vec::new(), BTreeMap::from([("CONNECT".into(), 1)])),
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(LOGIN_CONCURRENCY));
    let mut logins = tokio::task::JoinSet::new();
    for (i, (user_id, token)) in config.users.iter().enumerate() {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .expect("never closed");
        let (user_id, token, source) = (*user_id, token.clone(), config.source_ip);
        logins.spawn(async move {
            let r = subscribe_one(addr, source, user_id, &token, i).await;
            drop(permit);
            r
        });
    }
    let mut subs = Vec::new();
    let mut errors = BTreeMap::new();
    while let Some(joined) = logins.join_next().await {
        match joined {
            Ok(Ok((reader, writer))) => {
                let (agg, control, done) = (Arc::clone(agg), control.clone(), Arc::clone(done));
                subs.push(tokio::spawn(receive(reader, writer, agg, control, done)));
            }
            Ok(Err(kind)) => *errors.entry(kind).or_default() += 1,
            Err(_) => *errors.entry("WORKER_FAILED".to_owned()).or_default() += 1,
        }
    }
    (subs, errors)
}

type Reader = FrameReader<tokio::net::tcp::OwnedReadHalf>;

async fn send_frame(w: &mut OwnedWriteHalf, f: &v1::Frame) -> Result<(), String> {
    let mut bytes = BytesMut::new();
    encode_message(f, FRAME_BYTES_MAX, &mut bytes).map_err(|_| "ENCODE".to_owned())?;
    w.write_all(&bytes).await.map_err(|_| "WRITE".to_owned())
}

async fn answer(r: &mut Reader) -> Result<response::Kind, String> {
    loop {
        let payload = r
            .next_frame()
            .await
            .map_err(|_| "READ".to_owned())?
            .ok_or("CLOSED")?;
        let f: v1::Frame = decode_message(payload).map_err(|_| "DECODE".to_owned())?;
        match f.body {
            Some(frame::Body::Response(v1::Response { kind: Some(k) })) => return Ok(k),
            Some(frame::Body::Push(_)) => continue,
            _ => return Err("PROTOCOL".into()),
        }
    }
}

/// One subscriber: a raw framed connection (no `Client`: 15,000 of them must be cheap),
/// handshake, login (which registers it with the server's fan-out hub).
async fn subscribe_one(
    addr: SocketAddr,
    source: Ipv4Addr,
    user_id: u64,
    token: &str,
    i: usize,
) -> Result<(Reader, OwnedWriteHalf), String> {
    let socket = TcpSocket::new_v4().map_err(|_| "SOCKET".to_owned())?;
    if addr.ip().is_loopback() {
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .map_err(|_| "BIND".to_owned())?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|_| "CONNECT".to_owned())?;
    let _ = stream.set_nodelay(true);
    let (rh, mut wh) = stream.into_split();
    let mut reader = FrameReader::new(rh, FRAME_BYTES_MAX);
    let hs = request::Kind::Handshake(v1::Handshake {
        protocol_version: PROTOCOL_VERSION,
        client_name: CLIENT_NAME.to_owned(),
        session_token: String::new(),
        no_live_pushes: false,
    });
    send_frame(&mut wh, &v1::Frame::request(1, hs)).await?;
    match answer(&mut reader).await? {
        response::Kind::HandshakeOk(_) => {}
        _ => return Err("HANDSHAKE".into()),
    }
    let login = request::Kind::Login(v1::LoginRequest {
        user_id,
        login_token: token.to_owned(),
        device_id: format!("fanout-{i}"),
        device_name: "chatlog bench fanout".into(),
    });
    send_frame(&mut wh, &v1::Frame::request(2, login)).await?;
    match answer(&mut reader).await? {
        response::Kind::Login(_) => Ok((reader, wh)),
        response::Kind::Error(e) => Err(format!("LOGIN_{}", e.code().as_str_name())),
        _ => Err("LOGIN".into()),
    }
}

/// A subscriber's receive loop: checks seq order, times each post's arrival.
async fn receive(
    mut reader: Reader,
    mut writer: OwnedWriteHalf,
    agg: Arc<Mutex<Agg>>,
    mut control: tokio::sync::watch::Receiver<Control>,
    done: Arc<AtomicU64>,
) -> SubStats {
    let mut s = SubStats::default();
    let mut ping = tokio::time::interval(SUBSCRIBER_PING_EVERY);
    ping.tick().await;
    let mut next_request = 3u64;
    let mut counted_done = false;
    let mut open = true;
    loop {
        let c = control.borrow_and_update().clone();
        if c.stop {
            break;
        }
        if let Some((_, last)) = c.range
            && !counted_done
            && (s.last_seq >= last || !open)
        {
            counted_done = true;
            done.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = ping.tick(), if open => {
                let f = v1::Frame::request(next_request, request::Kind::Ping(v1::PingRequest { nonce: 0 }));
                next_request += 1;
                if send_frame(&mut writer, &f).await.is_err() {
                    s.error("DISCONNECTED");
                    open = false;
                }
            }
            next = reader.next_frame(), if open => {
                let payload = match next {
                    Ok(Some(p)) => p,
                    _ => {
                        s.error("DISCONNECTED");
                        open = false;
                        continue;
                    }
                };
                let arrived = mono_us();
                let Ok(f) = decode_message::<v1::Frame>(payload) else {
                    s.error("DECODE");
                    continue;
                };
                match f.body {
                    Some(frame::Body::Push(v1::Push { kind: Some(push::Kind::ChatEvents(ev)) })) => {
                        let warm_end = c.warm_end_us;
                        let mut agg = agg.lock().unwrap_or_else(|p| p.into_inner());
                        for e in &ev.events {
                            let Some(v1::event::Body::MessagePosted(m)) = &e.body else {
                                continue;
                            };
                            if s.last_seq != 0 && e.seq != s.last_seq + 1 {
                                s.error(if e.seq <= s.last_seq { "DUPLICATE" } else { "GAP" });
                            }
                            if s.first_post_seq == 0 {
                                s.first_post_seq = e.seq;
                            }
                            s.last_seq = e.seq;
                            s.in_range += 1;
                            let stamp = m
                                .text
                                .get(..STAMP_BYTES)
                                .and_then(|h| u64::from_str_radix(h, 16).ok())
                                .unwrap_or(0);
                            if warm_end != 0 && stamp >= warm_end {
                                report::record(
                                    &mut agg.delivery,
                                    Duration::from_micros(arrived.saturating_sub(stamp)),
                                );
                            }
                            let p = agg.per_post.entry(e.seq).or_default();
                            p.0 += 1;
                            p.1 = p.1.max(arrived);
                            p.2 = stamp;
                        }
                    }
                    Some(frame::Body::Push(v1::Push { kind: Some(push::Kind::Disconnect(_)) })) => {
                        s.error("DISCONNECTED");
                        open = false;
                    }
                    _ => {}
                }
            }
        }
    }
    if !counted_done && c_range_set(&control) {
        done.fetch_add(1, Ordering::Relaxed);
    }
    s
}

fn c_range_set(control: &tokio::sync::watch::Receiver<Control>) -> bool {
    control.borrow().range.is_some()
}

/// One child process holding subscribers.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<ChildStdout>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(addr: &str, config: &WorkerConfig) -> Result<Worker, CliError> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["bench", "fanout-worker", "--server", addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "error")
            .spawn()?;
        let stdin = child.stdin.take().ok_or("worker stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().ok_or("worker stdout")?).lines();
        let mut w = Worker {
            child,
            stdin,
            stdout,
        };
        w.tell(&config.to_json())?;
        Ok(w)
    }

    fn tell(&mut self, v: &Value) -> Result<(), CliError> {
        writeln!(self.stdin, "{v}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The worker's next line, read on a blocking thread.
    async fn hear(mut self) -> (Self, Result<Value, CliError>) {
        tokio::task::spawn_blocking(move || {
            let r = match self.stdout.next() {
                Some(Ok(line)) => serde_json::from_str(&line)
                    .map_err(|e| format!("fanout worker said {line:?}: {e}").into()),
                Some(Err(e)) => Err(e.into()),
                None => Err("a fanout worker exited early".into()),
            };
            (self, r)
        })
        .await
        .expect("the reading thread does not panic")
    }
}

/// Hears one line from every worker (each within [`WORKER_STEP_TIMEOUT`]).
async fn hear_all(workers: Vec<Worker>) -> Result<(Vec<Worker>, Vec<Value>), CliError> {
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(w.hear()))
        .collect();
    let mut ws = Vec::new();
    let mut vs = Vec::new();
    for t in tasks {
        let (w, v) = tokio::time::timeout(WORKER_STEP_TIMEOUT, t)
            .await
            .map_err(|_| "fanout workers did not answer in time")?
            .map_err(|e| format!("fanout worker: {e}"))?;
        ws.push(w);
        vs.push(v?);
    }
    Ok((ws, vs))
}

/// Creates `n` users through `conns` (pipelined); their (id, login token).
async fn create_users(
    conns: &[Client],
    run_id: u32,
    n: usize,
) -> Result<Vec<(u64, String)>, CliError> {
    let anon: Vec<Client> = conns.to_vec();
    let mut out = vec![(0u64, String::new()); n];
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut done = 0usize;
    while done < n {
        while next < n && pending.len() < SETUP_IN_FLIGHT {
            let c = anon[next % anon.len()].clone();
            let i = next;
            pending.spawn(async move {
                let r = c
                    .create_user(v1::CreateUserRequest {
                        name: format!("f{run_id:08x}_{i}"),
                    })
                    .await;
                (i, r)
            });
            next += 1;
        }
        match pending.join_next().await {
            Some(Ok((i, Ok(created)))) => {
                out[i] = (created.user_id, created.login_token);
                done += 1;
            }
            Some(Ok((_, Err(e)))) => return Err(setup_error("creating a member", e)),
            Some(Err(e)) => return Err(format!("setup: {e}").into()),
            None => break,
        }
    }
    Ok(out)
}

/// Invites `users` into `chat` through the owner's connections.
async fn invite_all(owner: &[Client], chat: u64, users: &[u64]) -> Result<(), CliError> {
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut done = 0usize;
    while done < users.len() {
        while next < users.len() && pending.len() < SETUP_IN_FLIGHT {
            let c = owner[next % owner.len()].clone();
            let user_id = users[next];
            pending.spawn(async move {
                c.invite(v1::InviteRequest {
                    chat_id: chat,
                    user_id,
                })
                .await
            });
            next += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(_))) => done += 1,
            Some(Ok(Err(e))) => return Err(setup_error("inviting a member", e)),
            Some(Err(e)) => return Err(format!("setup: {e}").into()),
            None => break,
        }
    }
    Ok(())
}

/// The newest seq of `chat`.
async fn head_seq(client: &Client, chat: u64) -> Result<u64, CliError> {
    Ok(client
        .history(v1::HistoryRequest {
            chat_id: chat,
            from_seq: 0,
            direction: v1::Direction::Backward.into(),
            limit: 1,
        })
        .await
        .map_err(|e| setup_error("reading the channel's head", e))?
        .head_seq)
}

/// How long the poster waits for a post's answer. Why: the figure wanted is when the
/// post committed, however late; the client's default would turn a slow commit into a
/// `TIMEOUT` without a time.
const POST_TIMEOUT: Duration = Duration::from_secs(120);

/// One post as the poster saw it.
#[derive(Debug, Clone, Copy)]
struct Posted {
    seq: u64,
    sent_us: u64,
    ack_us: u64,
    measured: bool,
}

/// Runs the fanout scenario against `addr`.
pub async fn fanout(args: &BenchArgs, addr: &str, embedded: bool) -> Result<Report, CliError> {
    raise_open_files_limit();
    let online = args.online;
    let members = args.members.unwrap_or(online).max(online);
    let workers_n = args
        .workers
        .unwrap_or_else(|| online.div_ceil(WORKER_CONNECTIONS_MAX))
        .clamp(1, online.max(1));
    let setup_started = Instant::now();
    // Setup connections: anonymous ones create users; the owner's invite and post.
    let setup_conns = args.connections.clamp(1, 16);
    let mut anon = Vec::new();
    for _ in 0..setup_conns {
        anon.push(
            Client::connect(addr, options(None, 128))
                .await
                .map_err(|e| setup_error(&format!("connecting to {addr}"), e))?,
        );
    }
    let run_id: u32 = rand::random();
    let owner_user = create_users(&anon[..1], run_id ^ 0x8000_0000, 1).await?[0].clone();
    let mut owner = Vec::new();
    for i in 0..setup_conns {
        let mut opts = options(None, 128);
        opts.request_timeout = POST_TIMEOUT;
        let c = Client::connect(addr, opts)
            .await
            .map_err(|e| setup_error("connecting", e))?;
        c.login(v1::LoginRequest {
            user_id: owner_user.0,
            login_token: owner_user.1.clone(),
            device_id: format!("fanout-owner-{i}"),
            device_name: "chatlog bench fanout".into(),
        })
        .await
        .map_err(|e| setup_error("logging the owner in", e))?;
        // The owner's own pushes are not read: the client drops them past its queue.
        owner.push(c);
    }
    let users = create_users(&anon, run_id, members).await?;
    drop(anon);
    let ids: Vec<u64> = users.iter().map(|u| u.0).collect();
    let first = ids.len().min(PAGE_ITEMS_MAX as usize);
    let chat = owner[0]
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Channel.into(),
            title: format!("fanout {run_id:08x}"),
            member_ids: ids[..first].to_vec(),
        })
        .await
        .map_err(|e| setup_error("creating the channel", e))?
        .chat_id;
    invite_all(&owner, chat, &ids[first..]).await?;
    // Only the owner's first connection stays: it posts.
    let poster = owner.swap_remove(0);
    drop(owner);

    // Subscribers: the first `online` members, spread over the workers.
    let mut workers = Vec::with_capacity(workers_n);
    let per = online.div_ceil(workers_n);
    for w in 0..workers_n {
        let share: Vec<(u64, String)> = users
            .iter()
            .take(online)
            .skip(w * per)
            .take(per)
            .cloned()
            .collect();
        if share.is_empty() {
            break;
        }
        let config = WorkerConfig {
            addr: addr.to_owned(),
            chat_id: chat,
            source_ip: Ipv4Addr::new(127, 0, (w / 250) as u8, (w % 250) as u8 + 2),
            users: share,
        };
        workers.push(Worker::start(addr, &config)?);
    }
    let (mut workers, ready) = hear_all(workers).await?;
    let head_before = head_seq(&poster, chat).await?;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut connected = 0u64;
    for r in &ready {
        connected += r["ready"].as_u64().unwrap_or(0);
        if let Some(e) = r["errors"].as_object() {
            for (k, n) in e {
                *errors.entry(format!("SETUP_{k}")).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();

    // Post every --post-interval-ms (open loop), each stamped with its send time.
    let interval = Duration::from_secs_f64(args.post_interval_ms / 1000.0);
    let started = Instant::now();
    let started_us = mono_us();
    let warm_end = started + Duration::from_secs_f64(args.warmup);
    let deadline = warm_end + Duration::from_secs_f64(args.duration);
    let warm_end_us = started_us + (args.warmup * 1e6) as u64;
    for w in &mut workers {
        w.tell(&json!({"go": {"warm_end_us": warm_end_us}}))?;
    }
    let cpu0 = embedded_cpu(embedded);
    let pad: String = "x".repeat(args.size.saturating_sub(STAMP_BYTES));
    let mut posts = tokio::task::JoinSet::new();
    let (mut i, mut measured_sent) = (0u64, 0u64);
    loop {
        let at = started + interval.mul_f64(i as f64);
        if at >= deadline || args.count.is_some_and(|c| measured_sent >= c) {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        // The intended start (no coordinated omission): a late post carries its
        // scheduled time.
        let sent_us = started_us + interval.mul_f64(i as f64).as_micros() as u64;
        let text = format!("{sent_us:016x}{pad}");
        let c = poster.clone();
        let measured = at >= warm_end;
        measured_sent += u64::from(measured);
        posts.spawn(async move {
            let r = c
                .send_message(v1::SendMessageRequest {
                    chat_id: chat,
                    client_message_id: i + 1,
                    text,
                    media: None,
                    reply_to_seq: 0,
                })
                .await;
            let ack_us = mono_us();
            r.map(|s| Posted {
                seq: s.seq,
                sent_us,
                ack_us,
                measured,
            })
        });
        i += 1;
    }
    let mut posted = Vec::new();
    while let Some(p) = posts.join_next().await {
        match p {
            Ok(Ok(p)) => posted.push(p),
            Ok(Err(e)) => *errors.entry(report::error_kind(e)).or_default() += 1,
            Err(_) => *errors.entry("WORKER_FAILED".into()).or_default() += 1,
        }
    }
    let cpu_posting = embedded_cpu(embedded)
        .zip(cpu0)
        .map(|(b, a)| report::cpu_delta(a, b))
        .unwrap_or(0.0);
    let posting_secs = started.elapsed().as_secs_f64();
    // Only the poster writes to the channel: what it committed is exactly the seqs after
    // `head_before` (a post whose answer timed out may have committed too, and every
    // subscriber must have it all the same).
    let head_after = head_seq(&poster, chat).await?;
    let (first_seq, last_seq) = (head_before + 1, head_after);
    let committed = head_after - head_before;
    if posted
        .iter()
        .any(|p| p.seq <= head_before || p.seq > head_after)
    {
        *errors.entry("POST_OUTSIDE_RANGE".into()).or_default() += 1;
    }
    for w in &mut workers {
        w.tell(
            &json!({"stop": {"first_seq": first_seq, "last_seq": last_seq,
                                "grace_ms": DELIVERY_GRACE.as_millis() as u64}}),
        )?;
    }
    let (workers, finals) = hear_all(workers).await?;
    drop(workers);
    let cpu_total = embedded_cpu(embedded)
        .zip(cpu0)
        .map(|(b, a)| report::cpu_delta(a, b))
        .unwrap_or(0.0);

    // Merge.
    let mut delivery = histogram();
    let mut per_post: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    let (mut deliveries, mut complete, mut subscribers, mut worker_rss) = (0u64, 0u64, 0u64, 0u64);
    for f in finals {
        let r = WorkerReport::from_json(&f).ok_or("a fanout worker's report is malformed")?;
        deliveries += r.deliveries;
        complete += r.complete;
        subscribers += r.subscribers;
        worker_rss = worker_rss.max(r.rss_bytes);
        for (k, n) in r.errors {
            *errors.entry(k).or_default() += n;
        }
        for (v, n) in r.delivery_us {
            delivery.saturating_record_n(v.max(1), n);
        }
        for (seq, n, at, stamp) in r.per_post {
            let e = per_post.entry(seq).or_default();
            e.0 += n;
            e.1 = e.1.max(at);
            e.2 = stamp;
        }
    }
    let expected = committed * subscribers;
    if deliveries < expected {
        *errors.entry("NOT_DELIVERED".into()).or_default() += expected - deliveries;
    }
    if subscribers < online as u64 {
        *errors.entry("NOT_ONLINE".into()).or_default() += online as u64 - subscribers;
    }
    let (mut post_ack, mut last_from_send, mut last_after_ack) =
        (histogram(), histogram(), histogram());
    for p in posted.iter().filter(|p| p.measured) {
        report::record(
            &mut post_ack,
            Duration::from_micros(p.ack_us.saturating_sub(p.sent_us)),
        );
        if let Some(&(_, at, _)) = per_post.get(&p.seq) {
            report::record(
                &mut last_after_ack,
                Duration::from_micros(at.saturating_sub(p.ack_us)),
            );
        }
    }
    // Measured posts by their send stamps (acknowledged or not).
    let (mut measured_posts, mut measured_deliveries, mut first_sent, mut last_arrival) =
        (0u64, 0u64, u64::MAX, 0u64);
    for &(n, at, stamp) in per_post.values().filter(|p| p.2 >= warm_end_us) {
        measured_posts += 1;
        measured_deliveries += n;
        first_sent = first_sent.min(stamp);
        last_arrival = last_arrival.max(at);
        report::record(
            &mut last_from_send,
            Duration::from_micros(at.saturating_sub(stamp)),
        );
    }
    let window_secs = if last_arrival > first_sent {
        (last_arrival - first_sent) as f64 / 1e6
    } else {
        0.0
    };
    let mut extra = Map::new();
    extra.insert(
        "fanout".into(),
        json!({
            "chat_id": chat,
            "members": members,
            "online": online,
            "subscribers": subscribers,
            "connected": connected,
            "workers": workers_n,
            "posts": committed,
            "posts_acknowledged": posted.len(),
            "posts_measured": measured_posts,
            "post_interval_ms": args.post_interval_ms,
            "deliveries_expected": expected,
            "deliveries": deliveries,
            "subscribers_complete": complete,
            "deliveries_per_sec": report::round2(if window_secs > 0.0 { measured_deliveries as f64 / window_secs } else { 0.0 }),
            "post_ack_us": latency_json(&post_ack),
            "last_delivery_us": latency_json(&last_from_send),
            "last_after_ack_us": latency_json(&last_after_ack),
            "server_cpu_ms_per_post": if embedded && committed > 0 {
                json!(report::round3(cpu_posting * 1000.0 / committed as f64))
            } else { Value::Null },
            "setup_secs": report::round2(setup_secs),
            "worker_rss_bytes_max": worker_rss,
        }),
    );
    Ok(Report {
        scenario: "fanout",
        config: Map::new(),
        command: String::new(),
        ops: measured_deliveries,
        ops_of: "deliveries of measured posts",
        latency_of: "send stamp to each subscriber's arrival",
        bytes: measured_deliveries * args.size as u64,
        measured_secs: window_secs,
        warmup_note: format!(
            "{} s of posts excluded from latency and throughput (their deliveries are checked)",
            args.warmup
        ),
        errors,
        by_kind: BTreeMap::new(),
        extra,
        server: embedded.then(|| {
            json!({
                "cpu_secs": report::round3(cpu_total),
                "cpu_cores": report::round3(if posting_secs > 0.0 { cpu_posting / posting_secs } else { 0.0 }),
                "rss_bytes": report::rss_bytes().unwrap_or(0),
            })
        }),
        latency: delivery,
    })
}

fn embedded_cpu(embedded: bool) -> Option<f64> {
    embedded
        .then(|| report::server_cpu_secs(CLIENT_THREADS))
        .flatten()
}
