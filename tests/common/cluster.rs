//! A cluster of real `chatlog serve` processes on 127.0.0.1 for black-box tests: each node
//! with its own data directory, killed (SIGKILL), paused (SIGSTOP), resumed and restarted on
//! the same directory and client address, and stopped for good when the cluster is dropped.
//!
//! Where leadership is: each node logs "leadership: this node leads the group" with the
//! group and term (`chatlog_raft::node`, at info); the harness reads those lines from the
//! processes' stderr, and the line with the highest term names the current leader. Other
//! stderr lines are echoed with a `[node N]` prefix (the first [`ECHO_LINES`] of each
//! process, and anything alarming after that).
//!
//! Peers may talk through a fault-injecting proxy: [`Options::peer_routes`] gives, per node,
//! the address it listens on for peers and the address the others dial (the proxy's).
//!
//! Post-mortems: with `CHATLOG_TEST_KEEP_DIR=DIR` the cluster's directory is made under
//! DIR and kept after the test (its path is printed), each node's whole stderr is also
//! written to `node-N.stderr` there, and `CHATLOG_TEST_NODE_LOG` replaces the nodes'
//! `RUST_LOG` (e.g. `warn,chatlog_raft::node=info,chatlog_raft::state_machine=debug` logs
//! every applied entry's log id and payload hash). `tests/dump_raft_log.rs` dumps a
//! kept node's Raft log offline.
//!
//! Included with `#[path = "common/cluster.rs"] mod cluster;` by the tests that need it;
//! not every test uses every item.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

// Both `server.rs` and `cluster.rs` include it; a test may include both.
#[allow(clippy::duplicate_mod)]
#[path = "port.rs"]
mod port;

use chatlog_wire::client::{Client, ClientError, ClientOptions, ReconnectPolicy};
use chatlog_wire::proto::v1::{self, ErrorCode};

/// Longest a node may take to announce its addresses.
pub const START_WAIT: Duration = Duration::from_secs(60);
/// Longest anything that needs an election may take.
pub const LEADER_WAIT: Duration = Duration::from_secs(60);
/// Longest an orderly stop (SIGTERM) may take.
pub const STOP_WAIT: Duration = Duration::from_secs(30);
/// Stderr lines echoed per process before only alarming ones are.
pub const ECHO_LINES: usize = 50;

/// Names a directory under which the cluster's data directories are made and KEPT after
/// the test, with each node's whole stderr (for post-mortems of randomised tests).
pub const KEEP_DIR_ENV: &str = "CHATLOG_TEST_KEEP_DIR";
/// Replaces the nodes' `RUST_LOG` when set.
pub const NODE_LOG_ENV: &str = "CHATLOG_TEST_NODE_LOG";

/// (group, term, node) of every "this node leads the group" line any node logged.
type Leadership = Arc<Mutex<Vec<(u64, u64, u64)>>>;

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes, numbered from 1.
    pub nodes: u64,
    /// `--groups`.
    pub groups: u64,
    /// `--heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// Serve the HTTP port too (`--http 127.0.0.1:0`).
    pub http: bool,
    /// Per node (index 0 is node 1): (address it listens on for peers, address the others
    /// dial). `None`: each node listens where the others dial.
    pub peer_routes: Option<Vec<(SocketAddr, SocketAddr)>>,
    /// More flags for every node.
    pub extra: Vec<String>,
    /// Data directories by node (index 0 is node 1), for a node that must live on a
    /// file system of its own; `None` (or a missing entry): under the cluster's temporary
    /// directory.
    pub dirs: Option<Vec<PathBuf>>,
    /// More environment variables for every node, set after `RUST_LOG` (so they may
    /// replace it).
    pub env: Vec<(String, String)>,
    /// Stderr lines containing any of these are recorded with their node
    /// ([`Cluster::captured`]).
    pub capture: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nodes: 3,
            groups: 4,
            heartbeat_ms: 100,
            http: false,
            peer_routes: None,
            extra: Vec::new(),
            dirs: None,
            env: Vec::new(),
            capture: Vec::new(),
        }
    }
}

impl Options {
    /// Four nodes, two groups, three replicas per group: node 1 holds no replica of
    /// group 1 (the static placement puts group 1 on nodes 2, 3, 4 and group 2 on nodes
    /// 3, 4, 1), for what a node without a replica does.
    pub fn more_nodes_than_replicas() -> Options {
        Options {
            nodes: 4,
            groups: 2,
            extra: vec!["--replicas".into(), "3".into()],
            ..Options::default()
        }
    }

    /// Three nodes, two groups, one replica per group: group 1 on node 2, group 2 on
    /// node 3, and node 1 holds neither (no node holds two groups).
    pub fn one_replica_per_group() -> Options {
        Options {
            nodes: 3,
            groups: 2,
            extra: vec!["--replicas".into(), "1".into()],
            ..Options::default()
        }
    }
}

/// One node's process and addresses.
pub struct Node {
    /// Its data directory.
    pub dir: PathBuf,
    /// Its client address (`127.0.0.1:0` until first announced).
    pub listen: String,
    /// Its HTTP address, when started with [`Options::http`].
    pub http: Option<String>,
    peer_listen: Option<SocketAddr>,
    /// `--join HTTP_ADDR` for a node added later ([`Cluster::join`]).
    join: Option<String>,
    child: Option<Child>,
    paused: bool,
}

/// Running nodes; every process is killed when this is dropped.
pub struct Cluster {
    _root: tempfile::TempDir,
    options: Options,
    initial: String,
    nodes: Vec<Node>,
    leadership: Leadership,
    /// (node, line) of every stderr line matching [`Options::capture`].
    captured: Arc<Mutex<Vec<(u64, String)>>>,
}

/// A port below the ephemeral range that was free a moment ago (`port.rs`: restarts
/// listen on the same ports).
pub fn free_port() -> u16 {
    port::free_port()
}

/// Removes ANSI colour sequences (the log format may colour field names).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Sends `sig` to a child process.
pub fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Announcements a starting node prints on stdout.
struct Announced {
    clients: String,
    http: Option<String>,
}

impl Cluster {
    /// Starts every node, each with its own data directory, and waits until each announced
    /// its addresses. Blocks: call it from `tokio::task::block_in_place` in async tests.
    pub fn start(options: Options) -> Cluster {
        let root = match std::env::var_os(KEEP_DIR_ENV) {
            Some(dir) => {
                std::fs::create_dir_all(&dir).expect("keep dir");
                let mut root = tempfile::Builder::new()
                    .prefix("cluster-")
                    .tempdir_in(&dir)
                    .expect("temp dir");
                root.disable_cleanup(true);
                eprintln!("cluster data kept in {}", root.path().display());
                root
            }
            None => tempfile::tempdir().expect("temp dir"),
        };
        let routes: Vec<(Option<SocketAddr>, String)> = match &options.peer_routes {
            Some(routes) => {
                assert_eq!(routes.len() as u64, options.nodes, "one route per node");
                routes
                    .iter()
                    .map(|(listen, dial)| (Some(*listen), dial.to_string()))
                    .collect()
            }
            None => (1..=options.nodes)
                .map(|_| (None, format!("127.0.0.1:{}", free_port())))
                .collect(),
        };
        let initial: Vec<String> = routes
            .iter()
            .enumerate()
            .map(|(i, (_, dial))| format!("{}={dial}", i + 1))
            .collect();
        let nodes = routes
            .iter()
            .enumerate()
            .map(|(i, (peer_listen, _))| Node {
                dir: options
                    .dirs
                    .as_ref()
                    .and_then(|d| d.get(i).cloned())
                    .unwrap_or_else(|| root.path().join(format!("node-{}", i + 1))),
                listen: port::free_addr(),
                http: None,
                peer_listen: *peer_listen,
                join: None,
                child: None,
                paused: false,
            })
            .collect();
        let mut cluster = Cluster {
            _root: root,
            options,
            initial: initial.join(","),
            nodes,
            leadership: Arc::default(),
            captured: Arc::default(),
        };
        // Start every process before waiting for any: a node announces its address only
        // after its groups have leaders, which needs the others.
        let ids: Vec<u64> = (1..=cluster.options.nodes).collect();
        let announced: Vec<_> = ids.iter().map(|id| cluster.spawn(*id)).collect();
        for (id, rx) in ids.into_iter().zip(announced) {
            cluster.wait_announced(id, rx);
        }
        cluster
    }

    /// Every stderr line so far (of any process of node `id`, restarts included) that
    /// matched [`Options::capture`], in order.
    pub fn captured(&self, id: u64) -> Vec<String> {
        self.captured
            .lock()
            .expect("lock")
            .iter()
            .filter(|(n, _)| *n == id)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The node ids, from 1 (nodes added with [`Cluster::join`] included).
    pub fn ids(&self) -> std::ops::RangeInclusive<u64> {
        1..=self.nodes.len() as u64
    }

    /// Starts one more node that joins the running cluster through node `via`'s HTTP port
    /// (`chatlog serve --join`, which registers it with `node add`); returns its id. It
    /// holds no replica until one is moved to it. Blocks. Needs [`Options::http`].
    pub fn join(&mut self, via: u64) -> u64 {
        let http = self.http_addr(via);
        let id = self.nodes.len() as u64 + 1;
        let peer = format!("127.0.0.1:{}", free_port());
        self.nodes.push(Node {
            dir: self._root.path().join(format!("node-{id}")),
            listen: port::free_addr(),
            http: None,
            peer_listen: Some(peer.parse().expect("address")),
            join: Some(http),
            child: None,
            paused: false,
        });
        let rx = self.spawn(id);
        self.wait_announced(id, rx);
        id
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// The client address of node `id`.
    pub fn addr(&self, id: u64) -> String {
        self.nodes[(id - 1) as usize].listen.clone()
    }

    /// The HTTP address of node `id` (started with [`Options::http`]).
    pub fn http_addr(&self, id: u64) -> String {
        self.nodes[(id - 1) as usize]
            .http
            .clone()
            .expect("the cluster serves HTTP")
    }

    /// The data directory of node `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.nodes[(id - 1) as usize].dir.clone()
    }

    fn spawn(&mut self, id: u64) -> mpsc::Receiver<Announced> {
        let initial = self.initial.clone();
        let leadership = Arc::clone(&self.leadership);
        let captured = Arc::clone(&self.captured);
        let options = self.options.clone();
        let node = self.node(id);
        std::fs::create_dir_all(&node.dir).expect("data dir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatlog"));
        cmd.args([
            "serve",
            "--node-id",
            &id.to_string(),
            "--listen",
            &node.listen,
        ])
        .args(["--groups", &options.groups.to_string()])
        .args(["--heartbeat-ms", &options.heartbeat_ms.to_string()])
        // The load here is many users' worth; rate limits have their own test (which
        // sets `--user-sends-per-sec` in `Options::extra`).
        .args(["--conn-requests-per-sec", "0"])
        .args(
            (!options.extra.iter().any(|a| a == "--user-sends-per-sec"))
                .then_some(["--user-sends-per-sec", "0"])
                .into_iter()
                .flatten(),
        )
        .args(&options.extra)
        .arg("--data-dir")
        .arg(&node.dir)
        .env(
            "RUST_LOG",
            std::env::var(NODE_LOG_ENV)
                .unwrap_or_else(|_| "warn,openraft=error,chatlog_raft::node=info".into()),
        )
        .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NO_COLOR", "1")
        .env_remove("CHATLOG_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        match &node.join {
            Some(http) => cmd.args(["--join", http]),
            None => cmd.args(["--initial-cluster", &initial]),
        };
        if options.http {
            // A restart keeps its HTTP address, like its client address.
            cmd.args(["--http", node.http.as_deref().unwrap_or("127.0.0.1:0")]);
        }
        if let Some(peer_listen) = node.peer_listen {
            cmd.args(["--peer-listen", &peer_listen.to_string()]);
        }
        let mut child = cmd.spawn().expect("chatlog serve starts");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let want_http = options.http;
        std::thread::spawn(move || {
            // Keep draining after the announcement, so the process never blocks on stdout.
            let mut http = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("http: ") {
                    http = Some(a.trim().to_string());
                } else if let Some(a) = line.strip_prefix("clients: ") {
                    // "http: " is printed before "clients: ".
                    assert!(!want_http || http.is_some(), "http announced first");
                    let _ = tx.send(Announced {
                        clients: a.trim().to_string(),
                        http: http.take(),
                    });
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let capture = options.capture.clone();
        let mut full_log = std::env::var_os(KEEP_DIR_ENV).map(|_| {
            let path = node.dir.with_file_name(format!("node-{id}.stderr"));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("node stderr file")
        });
        std::thread::spawn(move || {
            let mut echoed = 0;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if let Some(f) = full_log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if capture.iter().any(|c| line.contains(c.as_str())) {
                    captured.lock().expect("lock").push((id, line.clone()));
                }
                if line.contains("leadership: this node leads the group")
                    && let (Some(g), Some(t), Some(n)) = (
                        field(&line, "group"),
                        field(&line, "term"),
                        field(&line, "node"),
                    )
                {
                    leadership.lock().expect("lock").push((g, t, n));
                    continue;
                }
                // Faults make nodes chatty; keep the first lines and anything alarming.
                if echoed < ECHO_LINES || line.contains("panick") || line.contains("ERROR") {
                    echoed += 1;
                    eprintln!("[node {id}] {line}");
                }
            }
        });
        node.child = Some(child);
        node.paused = false;
        rx
    }

    fn wait_announced(&mut self, id: u64, rx: mpsc::Receiver<Announced>) {
        let announced = rx
            .recv_timeout(START_WAIT)
            .unwrap_or_else(|e| panic!("node {id} announced no client address: {e}"));
        // A restart listens on the same addresses, so clients redial them.
        let node = self.node(id);
        node.listen = announced.clients;
        if announced.http.is_some() {
            node.http = announced.http;
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self, id: u64) {
        let node = self.node(id);
        let mut child = node.child.take().expect("running");
        if node.paused {
            signal(&child, libc::SIGCONT);
        }
        child.kill().expect("kill");
        child.wait().expect("reaped");
        node.paused = false;
    }

    /// SIGTERM: the orderly stop (`serve` stops accepting, stops its groups, closes the
    /// engine); waits up to [`STOP_WAIT`] for the process to exit, then SIGKILLs it and
    /// fails. Blocks.
    pub fn stop(&mut self, id: u64) {
        let node = self.node(id);
        let mut child = node.child.take().expect("running");
        if node.paused {
            signal(&child, libc::SIGCONT);
            node.paused = false;
        }
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            if child.try_wait().expect("waits").is_some() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {id} did not stop within {STOP_WAIT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether node `id` has a running (possibly paused) process.
    pub fn is_running(&self, id: u64) -> bool {
        self.nodes[(id - 1) as usize].child.is_some()
    }

    /// Starts node `id` again on its data directory and addresses. Blocks.
    pub fn restart(&mut self, id: u64) {
        let rx = self.spawn(id);
        self.wait_announced(id, rx);
    }

    /// Starts the stopped nodes `ids` again at once (each on its data directory and
    /// addresses) and waits until each announced itself: nodes of a cluster that stopped
    /// whole need each other to elect leaders. Blocks.
    pub fn restart_all(&mut self, ids: &[u64]) {
        let announced: Vec<_> = ids.iter().map(|id| self.spawn(*id)).collect();
        for (id, rx) in ids.iter().zip(announced) {
            self.wait_announced(*id, rx);
        }
    }

    /// Replaces [`Options::extra`] for the processes started from now on (a restart with
    /// other flags).
    pub fn set_extra(&mut self, extra: Vec<String>) {
        self.options.extra = extra;
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) {
        let node = self.node(id);
        signal(node.child.as_ref().expect("running"), libc::SIGSTOP);
        node.paused = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) {
        let node = self.node(id);
        signal(node.child.as_ref().expect("running"), libc::SIGCONT);
        node.paused = false;
    }

    /// The node that led `group` in the highest term logged so far.
    pub fn last_leader(&self, group: u64) -> Option<u64> {
        self.leadership
            .lock()
            .expect("lock")
            .iter()
            .filter(|(g, _, _)| *g == group)
            .max_by_key(|(_, t, _)| *t)
            .map(|(_, _, n)| *n)
    }

    /// The value of counter `name` in node `id`'s `/metrics`.
    #[allow(dead_code)] // not every test file that includes this module reads metrics
    pub async fn counter(&self, id: u64, name: &str) -> u64 {
        let r = chatlog::http::client::request(
            &self.http_addr(id),
            "GET",
            "/metrics",
            None,
            None,
            LEADER_WAIT,
        )
        .await
        .expect("GET /metrics");
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} on node {id}"))
    }

    /// Moves `group`'s leadership to node `to` (`POST /admin/leader-transfer` on the
    /// leader's HTTP port, again until the logs show `to` leading), within
    /// [`LEADER_WAIT`].
    #[allow(dead_code)] // not every test file that includes this module moves leaders
    pub async fn lead_on(&self, group: u64, to: u64) {
        let deadline = Instant::now() + LEADER_WAIT;
        let (mut leader, mut term) = tokio::task::block_in_place(|| self.leader(group, 0));
        while leader != to {
            assert!(
                Instant::now() < deadline,
                "group {group}'s leadership never moved to node {to}"
            );
            let body = format!("{{\"group\": {group}, \"to\": {to}}}");
            let _ = chatlog::http::client::request(
                &self.http_addr(leader),
                "POST",
                "/admin/leader-transfer",
                None,
                Some(body.as_bytes()),
                LEADER_WAIT,
            )
            .await;
            (leader, term) = tokio::task::block_in_place(|| self.leader(group, term));
        }
    }

    /// The node that leads `group` in the highest term logged so far, once that term is
    /// above `above_term`; with the term. Waits up to [`LEADER_WAIT`]. Blocks.
    pub fn leader(&self, group: u64, above_term: u64) -> (u64, u64) {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let best = self
                .leadership
                .lock()
                .expect("lock")
                .iter()
                .filter(|(g, t, _)| *g == group && *t > above_term)
                .max_by_key(|(_, t, _)| *t)
                .map(|(_, t, n)| (*n, *t));
            if let Some(found) = best {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no leader of group {group} above term {above_term}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                if node.paused {
                    signal(&child, libc::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

// ---- Clients --------------------------------------------------------------------------

/// Client options for tests that switch nodes themselves: one redial per call, and
/// `retries_max` automatic resends of a request (with the same client message id).
pub fn client_options(
    token: Option<String>,
    request_timeout: Duration,
    retries_max: u32,
) -> ClientOptions {
    ClientOptions {
        token,
        connect_timeout: Duration::from_secs(1),
        request_timeout,
        reconnect: ReconnectPolicy {
            attempts_max: 1,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
        },
        retries_max,
        ..ClientOptions::default()
    }
}

/// Connects to `addr` with `options`, retrying until [`START_WAIT`] while the node cannot
/// take the connection or authenticate the token yet (its replica of the user's group
/// applies a login a heartbeat after the leader).
pub async fn connect_with(addr: &str, options: ClientOptions) -> Client {
    let deadline = Instant::now() + START_WAIT;
    loop {
        match Client::connect(addr, options.clone()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connecting to {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    }
}

/// Creates a user through `client` and logs in with it on device `device`: (user id,
/// session token). Right after start a group may still be electing (slower on a loaded
/// machine): UNAVAILABLE means nothing was proposed, so asking again is safe.
pub async fn create_and_login(client: &Client, name: &str, device: &str) -> (u64, String) {
    let created = create_user(client, name).await;
    let login = login(
        client,
        v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token,
            device_id: device.into(),
            device_name: format!("{name}'s {device}"),
        },
    )
    .await;
    (created.user_id, login.session_token)
}

/// Creates user `name` through `client`, asking again while the user's group has no
/// leader yet (UNAVAILABLE: nothing was proposed), for up to [`LEADER_WAIT`].
pub async fn create_user(client: &Client, name: &str) -> v1::CreateUserResponse {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        match client
            .create_user(v1::CreateUserRequest { name: name.into() })
            .await
        {
            Ok(created) => return created,
            Err(e) if retry_setup(&e) && Instant::now() < deadline => {
                eprintln!("creating {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("user {name} created: {e}"),
        }
    }
}

/// Logs in through `client`, asking again while the user's group has no leader yet
/// (UNAVAILABLE: nothing was proposed), for up to [`LEADER_WAIT`].
pub async fn login(client: &Client, request: v1::LoginRequest) -> v1::LoginResponse {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        match client.login(request.clone()).await {
            Ok(login) => return login,
            Err(e) if retry_setup(&e) && Instant::now() < deadline => {
                eprintln!("logging in {}: {e}; retrying", request.device_id);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{} logged in: {e}", request.device_id),
        }
    }
}

/// Waits until `client`'s node (`node`, for messages) serves `chat` up to seq `head`,
/// asking again while the node answers something retryable; panics after `wait`.
pub async fn wait_head(client: &Client, node: u64, chat: u64, head: u64, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        match client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: 0,
                direction: v1::Direction::Backward.into(),
                limit: 1,
            })
            .await
        {
            Ok(page) if page.head_seq == head => return,
            Ok(page) => eprintln!("node {node} at head {} of {head}", page.head_seq),
            Err(e) if retryable(&e) => eprintln!("node {node} not ready: {e}"),
            Err(e) => panic!("history on node {node}: {e}"),
        }
        assert!(Instant::now() < deadline, "node {node} did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a failed call may be tried again (with the same client message id for a send),
/// on this node or another: the server said unavailable or timed out, or the connection
/// failed; not for a refusal or a local error.
pub fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout)
        }
        ClientError::Timeout | ClientError::Disconnected | ClientError::Io(_) => true,
        ClientError::Protocol(_) | ClientError::Encode(_) | ClientError::LocalFile { .. } => false,
    }
}

/// Every event of `chat` as `client`'s node serves it (linearizable history, paged),
/// retrying retryable failures for up to `wait`.
pub async fn full_history(client: &Client, chat: u64, wait: Duration) -> Vec<v1::Event> {
    let deadline = Instant::now() + wait;
    let mut all: Vec<v1::Event> = Vec::new();
    loop {
        let from = all.last().map_or(1, |e| e.seq + 1);
        let page = client
            .history(v1::HistoryRequest {
                chat_id: chat,
                from_seq: from,
                direction: v1::Direction::Forward.into(),
                limit: 100,
            })
            .await;
        match page {
            Ok(page) => {
                let more = page.has_more;
                all.extend(page.events);
                if !more {
                    return all;
                }
            }
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("history of chat {chat} from {from}: {e}"),
        }
    }
}

/// Whether a failed setup call proposed nothing, so asking again is safe.
fn retry_setup(e: &ClientError) -> bool {
    e.code() == Some(ErrorCode::Unavailable)
}

/// A send of `text` to `chat` with client message id `cmid`, no media, no reply.
pub fn send_request(chat: u64, cmid: u64, text: &str) -> v1::SendMessageRequest {
    v1::SendMessageRequest {
        chat_id: chat,
        client_message_id: cmid,
        text: text.into(),
        media: None,
        reply_to_seq: 0,
    }
}

/// The seed of a randomised test: `CHATLOG_TEST_SEED` when set (to repeat a run), else
/// a random one; printed either way.
pub fn seed() -> u64 {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set CHATLOG_TEST_SEED={seed} to repeat)");
    seed
}

/// Sends messages `from..to` of `chat` (text `m<i> ` plus `text_bytes` of filler, client
/// message ids `i + 1`) with `writers` in flight, retrying each on the next client after
/// a retryable failure until `wait` has passed; any other failure panics naming the send.
pub async fn write_messages(
    clients: &[Client],
    chat: u64,
    (from, to): (u64, u64),
    writers: u64,
    text_bytes: usize,
    wait: Duration,
) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(from));
    let mut tasks = Vec::new();
    for t in 0..writers {
        let (clients, next) = (clients.to_vec(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= to {
                    return;
                }
                let text = format!("m{i:06} {}", "x".repeat(text_bytes));
                let deadline = Instant::now() + wait;
                let mut at = t as usize;
                loop {
                    match clients[at % clients.len()]
                        .send_message(send_request(chat, i + 1, &text))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if retryable(&e) && Instant::now() < deadline => {
                            at += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("send {i} failed: {e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}
