//! Black-box: streamed snapshots (`chatlog_raft::snapshot_stream`) on three real
//! `chatlog serve` processes with `--retain-entries` and 1 MiB segments.
//!
//! Covered: a follower stopped (SIGKILL) while the leader purges far past it comes back,
//! receives a snapshot whose retained range spans many chunks (the chunk size is made
//! small with `CHATLOG_TEST_SNAPSHOT_CHUNK_BYTES`, so the range needs no 192 MiB), and
//! then serves exactly the leader's history, event for event. A receiver SIGKILLed in
//! the middle of a transfer, and again in the middle of an install (after the checkpoint,
//! before the range: `CHATLOG_TEST_SNAPSHOT_PAUSE_MS` makes each step wait and log
//! itself), restarts consistent: the interrupted install is finished at open and the
//! node serves the leader's history.
//!
//! The chunk protocol's refusals (order, totals, checksums) are tested against a real
//! engine in `raft/src/snapshot_stream.rs`. Every wait has a deadline. The seed (writer
//! order) is printed; set `CHATLOG_TEST_SEED` to repeat a run.

#[path = "common/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use chatlog_raft::chat::group_of;
use chatlog_wire::client::Client;
use chatlog_wire::proto::v1;
use cluster::{Cluster, Options, full_history};

/// Longest anything that needs an election, a snapshot or a catch-up may take.
const WAIT: Duration = Duration::from_secs(120);
/// `--retain-entries` of every node.
const RETAIN_ENTRIES: u64 = 200;
/// Bytes of text per message.
const TEXT_BYTES: usize = 2000;
/// Writers in flight.
const WRITERS: u64 = 8;
/// Chunks the first test's snapshot range must at least take (the "many chunks"
/// threshold).
const CHUNKS_MIN: u64 = 50;
/// The first test's snapshot chunk size (`CHATLOG_TEST_SNAPSHOT_CHUNK_BYTES`).
const CHUNK_BYTES: usize = 4096;

async fn connect(addr: &str, token: Option<String>) -> Client {
    cluster::connect_with(
        addr,
        cluster::client_options(token, Duration::from_secs(10), 1),
    )
    .await
}

/// Sends messages `from..to` with [`WRITERS`] in flight ([`cluster::write_messages`]).
async fn write(clients: &[Client], chat: u64, from: u64, to: u64) {
    cluster::write_messages(clients, chat, (from, to), WRITERS, TEXT_BYTES, WAIT).await
}

/// Three nodes with retention, snapshot chunks of `chunk_bytes` and, if given, the
/// receiver's test pause; the snapshot stream's log lines captured.
fn start(chunk_bytes: usize, pause_ms: Option<u64>) -> Cluster {
    let mut env = vec![
        (
            "RUST_LOG".to_string(),
            "warn,openraft=error,chatlog_raft::node=info,chatlog_raft::snapshot_stream=info"
                .to_string(),
        ),
        (
            "CHATLOG_TEST_SNAPSHOT_CHUNK_BYTES".to_string(),
            chunk_bytes.to_string(),
        ),
    ];
    if let Some(ms) = pause_ms {
        env.push(("CHATLOG_TEST_SNAPSHOT_PAUSE_MS".to_string(), ms.to_string()));
    }
    Cluster::start(Options {
        groups: 2,
        extra: vec![
            "--retain-entries".into(),
            RETAIN_ENTRIES.to_string(),
            "--segment-mb".into(),
            "1".into(),
        ],
        env,
        capture: vec!["snapshot stream".into()],
        http: true,
        ..Options::default()
    })
}

/// A chat on a 3-node cluster, its group's leader, the follower to stop, and writers'
/// clients on the two other nodes.
struct Setup {
    token: String,
    chat: u64,
    leader: u64,
    follower: u64,
    clients: Vec<Client>,
}

async fn setup(cluster: &Cluster) -> Setup {
    let c1 = connect(&cluster.addr(1), None).await;
    let (_alice, token) = cluster::create_and_login(&c1, "alice", "dev").await;
    let a = connect(&cluster.addr(1), Some(token.clone())).await;
    let chat = a
        .create_chat(v1::CreateChatRequest {
            kind: v1::ChatKind::Group.into(),
            title: "snapshots".into(),
            member_ids: Vec::new(),
        })
        .await
        .expect("chat created")
        .chat_id;
    let group = group_of(chat);
    let (leader, _) = tokio::task::block_in_place(|| cluster.leader(group, 0));
    let follower = cluster.ids().find(|n| *n != leader).expect("a follower");
    let other = cluster
        .ids()
        .find(|n| *n != leader && *n != follower)
        .expect("a third node");
    eprintln!("chat {chat} in group {group}: leader {leader}, stopping {follower}");
    let clients = vec![
        connect(&cluster.addr(leader), Some(token.clone())).await,
        connect(&cluster.addr(other), Some(token.clone())).await,
    ];
    Setup {
        token,
        chat,
        leader,
        follower,
        clients,
    }
}

/// Writes a little with everyone up, stops the follower (SIGKILL), writes far more than
/// the retention and waits until the leader trimmed. Returns the chat's head.
async fn leave_the_follower_behind(cluster: &mut Cluster, s: &Setup) -> u64 {
    write(&s.clients, s.chat, 0, 100).await;
    cluster.kill(s.follower);
    let to = 3000;
    write(&s.clients, s.chat, 100, to).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let page = s.clients[0]
            .history(v1::HistoryRequest {
                chat_id: s.chat,
                from_seq: 1,
                direction: v1::Direction::Forward.into(),
                limit: 1,
            })
            .await
            .expect("history");
        if page.events.first().is_some_and(|e| e.seq > 1) {
            eprintln!("the leader serves from seq {}", page.events[0].seq);
            return to + 1;
        }
        assert!(Instant::now() < deadline, "the leader never trimmed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until node `id` logged (after its first `skip` captured lines) a line holding
/// `what`; returns the line and how many captured lines it is into the node's list.
fn wait_line(cluster: &Cluster, id: u64, skip: usize, what: &str) -> (String, usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = cluster.captured(id);
        if let Some((k, line)) = lines
            .iter()
            .enumerate()
            .skip(skip)
            .find(|(_, l)| l.contains(what))
        {
            return (line.clone(), k + 1);
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never logged {what:?}; it logged {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The value of `name=N` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The follower (restarted) serves the same history as the leader, every event equal,
/// from the first retained seq to `head`.
async fn same_history(cluster: &Cluster, s: &Setup, head: u64) {
    let f = connect(&cluster.addr(s.follower), Some(s.token.clone())).await;
    cluster::wait_head(&f, s.follower, s.chat, head, WAIT).await;
    let on_leader = full_history(&s.clients[0], s.chat, WAIT).await;
    let on_follower = full_history(&f, s.chat, WAIT).await;
    let first = on_leader.first().expect("retained").seq;
    assert!(first > 1, "the leader trimmed below retention");
    assert_eq!(on_leader.last().expect("last").seq, head);
    for (k, e) in on_leader.iter().enumerate() {
        assert_eq!(e.seq, first + k as u64, "the leader's history is dense");
    }
    assert_eq!(
        on_follower.len(),
        on_leader.len(),
        "node {} serves {} events from seq {:?}, the leader {} from seq {first}",
        s.follower,
        on_follower.len(),
        on_follower.first().map(|e| e.seq),
        on_leader.len()
    );
    for (l, f) in on_leader.iter().zip(&on_follower) {
        assert_eq!(l, f, "event {} differs between leader and follower", l.seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_installs_a_streamed_snapshot_and_serves_the_same_history() {
    let started = Instant::now();
    let _ = cluster::seed();
    let mut cluster = tokio::task::block_in_place(|| start(CHUNK_BYTES, None));
    let s = setup(&cluster).await;
    let head = leave_the_follower_behind(&mut cluster, &s).await;

    // A snapshot of the leader at its head (`chatlog admin snapshot`), so the range it
    // carries is the whole retained log, not whatever lay below retention's last one.
    let http = cluster.http_addr(s.leader);
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chatlog"))
            .args(["admin", "snapshot", "--server", &http])
            .env_remove("CHATLOG_ADMIN_TOKEN")
            .output()
            .expect("chatlog runs")
    });
    assert!(
        out.status.success(),
        "admin snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let skip = cluster.captured(s.follower).len();
    tokio::task::block_in_place(|| cluster.restart(s.follower));
    let (begin, at) = tokio::task::block_in_place(|| {
        wait_line(&cluster, s.follower, skip, "snapshot stream: receiving")
    });
    let (line, _) = tokio::task::block_in_place(|| {
        wait_line(&cluster, s.follower, at, "snapshot stream: received")
    });
    eprintln!("node {}: {begin}\n{line}", s.follower);
    let chunks = field(&line, "chunks").expect("chunks=");
    let entries = field(&line, "entries").expect("entries=");
    let range_bytes = field(&line, "bytes").expect("bytes=")
        - field(&begin, "checkpoint_bytes").expect("checkpoint_bytes=");
    assert!(entries > 0, "the snapshot carried the retained range");
    // The log range alone, not only the checkpoint, spans many chunks.
    assert!(
        range_bytes / CHUNK_BYTES as u64 >= CHUNKS_MIN,
        "the range took {} of the {chunks} chunks, the test wants at least {CHUNKS_MIN}",
        range_bytes / CHUNK_BYTES as u64
    );
    tokio::task::block_in_place(|| {
        wait_line(&cluster, s.follower, skip, "snapshot stream: installed")
    });
    same_history(&cluster, &s, head).await;
    eprintln!("test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_mid_transfer_and_mid_install_restarts_consistent() {
    let started = Instant::now();
    let _ = cluster::seed();
    // Chunks of 32 KiB (the checkpoint alone takes several), each step of the receiver
    // pausing long enough for a SIGKILL to land inside it.
    let mut cluster = tokio::task::block_in_place(|| start(32 << 10, Some(800)));
    let s = setup(&cluster).await;
    let head = leave_the_follower_behind(&mut cluster, &s).await;

    // Killed while chunks arrive: nothing was installed, the next start discards them.
    let skip = cluster.captured(s.follower).len();
    tokio::task::block_in_place(|| cluster.restart(s.follower));
    tokio::task::block_in_place(|| wait_line(&cluster, s.follower, skip, "chunk staged"));
    cluster.kill(s.follower);
    eprintln!("killed node {} in the middle of a transfer", s.follower);
    let lines = cluster.captured(s.follower);
    assert!(
        !lines[skip..].iter().any(|l| l.contains("stream: received")),
        "the kill landed after the transfer: {lines:#?}"
    );

    // Killed in the middle of the install: the checkpoint is written, the range not.
    let skip = cluster.captured(s.follower).len();
    tokio::task::block_in_place(|| cluster.restart(s.follower));
    tokio::task::block_in_place(|| {
        wait_line(
            &cluster,
            s.follower,
            skip,
            "deleting the pieces of an unfinished transfer",
        )
    });
    tokio::task::block_in_place(|| {
        wait_line(&cluster, s.follower, skip, "install checkpoint written")
    });
    cluster.kill(s.follower);
    eprintln!("killed node {} in the middle of an install", s.follower);
    let lines = cluster.captured(s.follower);
    assert!(
        !lines[skip..]
            .iter()
            .any(|l| l.contains("install range written") || l.contains("stream: installed")),
        "the kill landed after the install: {lines:#?}"
    );

    // The restart finishes the install from the staged stream before serving.
    let skip = cluster.captured(s.follower).len();
    tokio::task::block_in_place(|| cluster.restart(s.follower));
    tokio::task::block_in_place(|| {
        wait_line(
            &cluster,
            s.follower,
            skip,
            "finishing an install interrupted by a crash",
        )
    });
    same_history(&cluster, &s, head).await;
    eprintln!("test took {:?}", started.elapsed());
}
