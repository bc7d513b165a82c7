//! Peak memory of a retention snapshot (issue 3, s9snap): one group's state machine on a
//! real engine builds up many indexed events, then takes the snapshot retention asks
//! openraft for, then sends it to a second state machine (another engine in this
//! process) that installs it.
//!
//! `cargo bench -p chatlog-raft --bench snapshot_memory` (release; `bench = false`, so by
//! name). `CHATLOG_SNAPSHOT_RSS_EVENTS` posts (default 5,000,000; 16 per Raft entry,
//! spread over 64 chats, timestamps 1 ms apart so the de-duplication window holds its
//! maximum), data under `CHATLOG_SNAPSHOT_RSS_DIR` (default the temp dir), each engine's
//! record cache `CHATLOG_SNAPSHOT_RSS_CACHE_MB` (default 64 MiB). The group's
//! replicated retention policy keeps 1,000,000 entries: nothing is trimmed, every event
//! stays indexed. Periodic checkpoints every 20,000 entries, as production.
//!
//! Each phase's peak is measured alone: the process's peak RSS is reset (`5` written to
//! `/proc/self/clear_refs`) before it and `VmHWM` read after it; `VmRSS` before and after
//! says what stays resident. Phases: `build` (apply every entry), `snapshot`
//! (`get_snapshot_builder` + `build_snapshot`: what `crate::retention` triggers), `send`
//! (`snapshot_stream::send` into the receiver's staging, chunk by chunk, the sender's
//! snapshot handle held), `install` (the receiver's `install_snapshot`). The states'
//! encodings are compared at the end (outside the measured phases).
//!
//! Only public APIs that exist before and after s9snap are used (the state machine's
//! openraft traits, `snapshot_stream::send` and `Staging`), so the same file measures
//! the code before it for an A/B (benches/RESULTS.md says how).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_raft::chat::retention::{RetentionCommand, RetentionPolicy};
use chatlog_raft::chat::{Batch, ChatKind, Command};
use chatlog_raft::snapshot_stream::{self, Received, StreamAck};
use chatlog_raft::state_machine::{ChatStateMachine, SmConfig};
use chatlog_raft::types::{ChatBatch, Entry, EntryPayload, GroupId, Vote, log_id};
use chatlog_storage::Engine;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

const GROUP: GroupId = 1;
/// Posts per Raft entry.
const POSTS_PER_ENTRY: u64 = 16;
/// Chats the posts are spread over.
const CHATS: u64 = 64;
/// Entries handed to one `apply`.
const APPLY_ENTRIES: u64 = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn rss_hwm() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("writes /proc/self/clear_refs");
}

/// Runs `phase`, printing its peak and what stays resident.
async fn measured<T>(name: &str, phase: impl std::future::Future<Output = T>) -> T {
    reset_peak();
    let (before, _) = rss_hwm();
    let started = Instant::now();
    let out = phase.await;
    let elapsed = started.elapsed();
    let (after, peak) = rss_hwm();
    println!(
        "phase {name:<8} rss before {before:8.1} MiB  peak {peak:8.1} MiB (+{:7.1})  rss after \
         {after:8.1} MiB (+{:7.1})  {:.1} s",
        peak - before,
        after - before,
        elapsed.as_secs_f64()
    );
    out
}

/// Each engine's cache of checked records (`chatlog_storage::Config::read_cache_bytes`):
/// `CHATLOG_SNAPSHOT_RSS_CACHE_MB`, default the engine's (64 MiB). Reads fill it up to
/// that bound whatever reads them, so a small one isolates the snapshot's own memory.
fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let mut config = chatlog_storage::Config::new(dir);
    if let Ok(mb) = std::env::var("CHATLOG_SNAPSHOT_RSS_CACHE_MB") {
        config.read_cache_bytes = mb.parse::<usize>().expect("a number of MiB") << 20;
    }
    Arc::new(Engine::open(config).expect("engine opens"))
}

fn entry(index: u64, commands: Vec<Command>) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(ChatBatch(
            Batch {
                timestamp_ms: 1_000_000 + index,
                commands,
            }
            .encode(),
        )),
    }
}

async fn apply(sm: &mut ChatStateMachine, entries: Vec<Entry>) {
    let items = entries
        .into_iter()
        .map(|e| Ok::<_, std::io::Error>((e, None)));
    sm.apply(futures_util::stream::iter(items))
        .await
        .expect("applies");
}

/// The group: a user, `CHATS` chats, a retention policy keeping everything, then
/// `events` posts. Returns the last index.
async fn build(sm: &mut ChatStateMachine, events: u64) -> u64 {
    let user = chatlog_raft::chat::make_id(GROUP, 1);
    let mut first = vec![entry(
        1,
        vec![Command::CreateUser {
            name: "ann".into(),
            login_token_hash: [1; 32],
        }],
    )];
    first.push(entry(
        2,
        (0..CHATS)
            .map(|i| Command::CreateChat {
                creator: user,
                kind: ChatKind::Group,
                title: format!("c{i}"),
                members: vec![],
            })
            .collect(),
    ));
    first.push(entry(
        3,
        vec![Command::Retention(RetentionCommand {
            policy: RetentionPolicy {
                retain_entries: Some(1_000_000),
                retain_bytes: None,
            },
            only_if_unset: false,
        })],
    ));
    apply(sm, first).await;
    let entries = events.div_ceil(POSTS_PER_ENTRY);
    let mut index = 3;
    let mut cmid = 0u64;
    while index < 3 + entries {
        let n = (3 + entries - index).min(APPLY_ENTRIES);
        let batch: Vec<Entry> = (0..n)
            .map(|k| {
                let posts = (0..POSTS_PER_ENTRY)
                    .map(|_| {
                        cmid += 1;
                        Command::Post {
                            chat: chatlog_raft::chat::make_id(GROUP, 1 + cmid % CHATS),
                            sender: user,
                            client_message_id: cmid,
                            text: "x".into(),
                            media: None,
                            reply_to: 0,
                        }
                    })
                    .collect();
                entry(index + 1 + k, posts)
            })
            .collect();
        apply(sm, batch).await;
        index += n;
    }
    index
}

/// FNV-1a 64 of a state's whole encoding.
fn digest(sm: &ChatStateMachine) -> (u64, u64) {
    let state = sm.shared();
    let st = state.read();
    (
        chatlog_raft::codec::fnv1a(&st.encode()),
        st.events_applied(),
    )
}

async fn run() {
    let events = env_u64("CHATLOG_SNAPSHOT_RSS_EVENTS", 5_000_000);
    let root = tempfile::tempdir_in(
        std::env::var("CHATLOG_SNAPSHOT_RSS_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().to_string_lossy().into_owned()),
    )
    .expect("a temp dir");
    let config = SmConfig {
        checkpoint_every_entries: 20_000,
        retention: RetentionPolicy::keep_all(),
    };
    let mut sender = ChatStateMachine::open(engine(&root.path().join("sender")), GROUP, config)
        .expect("the sender opens");
    let last = measured("build", build(&mut sender, events)).await;
    let snapshot = measured("snapshot", async {
        let mut builder = sender.get_snapshot_builder().await;
        builder.build_snapshot().await.expect("a snapshot")
    })
    .await;
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(last));
    let mut receiver = ChatStateMachine::open(engine(&root.path().join("receiver")), GROUP, config)
        .expect("the receiver opens");
    let staging = receiver.staging().expect("a staging log");
    let meta = snapshot.meta.clone();
    let staged = measured("send", async {
        let staged = Arc::new(std::sync::Mutex::new(None));
        let call = |body: Bytes, _wait: Duration| {
            let (staging, staged) = (Arc::clone(&staging), Arc::clone(&staged));
            async move {
                let chunk = snapshot_stream::decode_chunk(&body).map_err(|e| e.to_string())?;
                let (transfer, seq) = (chunk.transfer, chunk.seq);
                match staging.receive(chunk).await.map_err(|e| e.to_string())? {
                    Received::Ack(ack) => Ok::<Bytes, String>(snapshot_stream::encode_ack(&ack)),
                    Received::Complete { vote, snapshot } => {
                        *staged.lock().unwrap() = Some(snapshot);
                        Ok(snapshot_stream::encode_ack(&StreamAck {
                            transfer,
                            seq,
                            vote,
                        }))
                    }
                }
            }
        };
        snapshot_stream::send(
            GROUP,
            Vote::new(1, 1),
            snapshot,
            snapshot_stream::chunk_bytes(),
            call,
        )
        .await
        .unwrap_or_else(|e| panic!("the transfer fails: {e:?}"));
        staged.lock().unwrap().take().expect("staged")
    })
    .await;
    measured("install", async {
        receiver
            .install_snapshot(&meta, staged.snapshot)
            .await
            .expect("installs");
    })
    .await;
    let (a, b) = (digest(&sender), digest(&receiver));
    assert_eq!(a, b, "the receiver's state is the sender's");
    println!(
        "{events} posts in {last} entries: sender and receiver states equal (digest {:016x}, \
         {} events)",
        a.0, a.1
    );
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(run());
}
