//! Snapshot streaming throughput (issue "Replicated chat logs", snapshots of any size):
//! MB/s of streaming a group with about 1 GiB retained from one engine to another.
//!
//! `cargo bench -p chatlog-raft --bench snapshot_figures -- [stream] [checkpoint]`
//! (release build; both sections by default).
//!
//! `checkpoint`: the CPU cost of a group's periodic checkpoint on the apply path at 1M
//! and 10M indexed events (`CHATLOG_CHECKPOINT_EVENTS_M`, default `1,10`; 16 posts per
//! Raft entry): the whole-state encoding (`GroupState::encode`, what every checkpoint
//! encoded before) against the incremental one after 20,000 more entries (the default
//! `checkpoint_every_entries`): the state outside the index chunks plus the chunks
//! completed since (`chat::index_chunks`), and the bytes each writes.
//!
//! `stream`:
//! Two "nodes" in this process, each with its own engine and data directory: the sender's
//! group log holds `CHATLOG_SNAPSHOT_MB` MiB (default 1,024) of entries of 64 KiB of
//! incompressible bytes; `snapshot_stream::send` streams a snapshot at its last entry
//! over one real TCP connection on 127.0.0.1 (length-prefixed frames, a request id per
//! frame, answers paired by id like the node transport's, one task per request on the
//! receiving side like `network::server`) into the receiver's `snapshot_stream::Staging`,
//! which stages it; then the staged snapshot is installed by a receiver state machine
//! (`install_snapshot`: the checkpoint's pieces, their load, intent, pointer, the range
//! written into the receiver's Raft log, clear). The checkpoint is a small real one (an
//! empty group's state, written incrementally): this measures the range. It prints, per
//! repeat, the transfer (Begin to the answer of End: the staged stream durable) and the
//! install, in MB/s of stream bytes, and the median of `CHATLOG_SNAPSHOT_REPEATS` repeats
//! (default 3; the sender's log is written once, each repeat streams into a fresh
//! receiver).
//!
//! Since s9snap the snapshot's checkpoint is a stored incremental one
//! (`checkpoint_chunks::CheckpointHandle`), so this file no longer builds against
//! revisions before it; the memory side of snapshots is `snapshot_memory`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_raft::checkpoint_chunks::CheckpointHandle;
use chatlog_raft::log_store::LogStore;
use chatlog_raft::snapshot_stream::{
    self, LocalSnapshot, Received, SnapshotData, Staging, StreamAck,
};
use chatlog_raft::state_machine::{ChatStateMachine, SmConfig};
use chatlog_raft::types::{
    ChatBatch, Entry, EntryPayload, GroupId, Membership, Snapshot, SnapshotMeta, StoredMembership,
    Vote, log_id,
};
use chatlog_storage::Engine;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const GROUP: GroupId = 1;
/// Payload bytes of one entry: large entries, as a busy group's batches are.
const ENTRY_BYTES: usize = 64 << 10;
/// Entries appended to the sender's log per append.
const APPEND_ENTRIES: usize = 256;
/// Frames queued for the socket writer on either side.
const FRAME_QUEUE_MAX: usize = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    Arc::new(Engine::open(chatlog_storage::Config::new(dir)).expect("engine opens"))
}

fn close(engine: Arc<Engine>) {
    let mut engine = engine;
    for _ in 0..1000 {
        match Arc::try_unwrap(engine) {
            Ok(e) => {
                e.close().expect("engine closes");
                return;
            }
            Err(shared) => engine = shared,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the engine is still shared");
}

fn meta(last: u64) -> SnapshotMeta {
    let voters: std::collections::BTreeSet<u64> = [1, 2].into();
    SnapshotMeta {
        last_log_id: Some(log_id(1, 1, last)),
        last_membership: StoredMembership::new(
            Some(log_id(1, 1, 1)),
            Membership::new_with_defaults(vec![voters], []),
        ),
    }
}

/// Fills the sender's log with `total` bytes of entries; returns the last index.
async fn fill(store: &mut LogStore, total: u64) -> u64 {
    let count = total.div_ceil(ENTRY_BYTES as u64).max(1);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = 1u64;
    while next <= count {
        let n = (count - next + 1).min(APPEND_ENTRIES as u64);
        let entries: Vec<Entry> = (next..next + n)
            .map(|i| {
                let mut payload = vec![0u8; ENTRY_BYTES];
                for word in payload.chunks_mut(8) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    word.copy_from_slice(&seed.to_le_bytes()[..word.len()]);
                }
                Entry {
                    log_id: log_id(1, 1, i),
                    payload: EntryPayload::Normal(ChatBatch(Bytes::from(payload))),
                }
            })
            .collect();
        store.blocking_append(entries).await.expect("appends");
        next += n;
    }
    count
}

async fn write_frame(stream: &mut tokio::net::tcp::OwnedWriteHalf, id: u64, body: &[u8]) {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&id.to_le_bytes());
    head[8..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    stream.write_all(&head).await.expect("writes");
    stream.write_all(body).await.expect("writes");
}

async fn read_frame(stream: &mut tokio::net::tcp::OwnedReadHalf) -> Option<(u64, Bytes)> {
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    let id = u64::from_le_bytes(head[..8].try_into().unwrap());
    let len = u32::from_le_bytes(head[8..].try_into().unwrap()) as usize;
    assert!(len <= chatlog_wire::limits::NODE_FRAME_BYTES_MAX as usize);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((id, Bytes::from(body)))
}

/// The receiving node: one task per request, answers through one writer.
async fn serve(
    listener: TcpListener,
    staging: Arc<Staging>,
    done: mpsc::Sender<Snapshot<SnapshotData>>,
) {
    let (socket, _) = listener.accept().await.expect("accepts");
    socket.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = socket.into_split();
    let (tx, mut rx) = mpsc::channel::<(u64, Bytes)>(FRAME_QUEUE_MAX);
    tokio::spawn(async move {
        while let Some((id, body)) = rx.recv().await {
            write_frame(&mut wr, id, &body).await;
        }
    });
    while let Some((id, body)) = read_frame(&mut rd).await {
        let (staging, tx, done) = (Arc::clone(&staging), tx.clone(), done.clone());
        tokio::spawn(async move {
            let chunk = snapshot_stream::decode_chunk(&body).expect("a chunk");
            let (transfer, seq) = (chunk.transfer, chunk.seq);
            let answer = match staging.receive(chunk).await {
                Ok(Received::Ack(ack)) => snapshot_stream::encode_ack(&ack),
                Ok(Received::Complete { vote, snapshot }) => {
                    done.send(snapshot).await.expect("handed over");
                    snapshot_stream::encode_ack(&StreamAck {
                        transfer,
                        seq,
                        vote,
                    })
                }
                Err(e) => panic!("chunk {seq} refused: {e}"),
            };
            let _ = tx.send((id, answer)).await;
        });
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

/// The sending node's side of the connection: `call` sends a frame and waits for the
/// answer with its id.
async fn connect(addr: std::net::SocketAddr) -> (mpsc::Sender<(u64, Bytes)>, Pending) {
    let socket = TcpStream::connect(addr).await.expect("connects");
    socket.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = socket.into_split();
    let (tx, mut rx) = mpsc::channel::<(u64, Bytes)>(FRAME_QUEUE_MAX);
    tokio::spawn(async move {
        while let Some((id, body)) = rx.recv().await {
            write_frame(&mut wr, id, &body).await;
        }
    });
    let pending: Pending = Arc::default();
    let answers = Arc::clone(&pending);
    tokio::spawn(async move {
        while let Some((id, body)) = read_frame(&mut rd).await {
            if let Some(waiter) = answers.lock().unwrap().remove(&id) {
                let _ = waiter.send(body);
            }
        }
    });
    (tx, pending)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = args.is_empty();
    if all || args.iter().any(|a| a == "checkpoint") {
        checkpoint_figures();
    }
    if all || args.iter().any(|a| a == "stream") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run());
    }
}

/// Posts per Raft entry in the checkpoint figures.
const POSTS_PER_ENTRY: u64 = 16;
/// Entries between two checkpoints (`SmConfig::checkpoint_every_entries`' default).
const CHECKPOINT_EVERY_ENTRIES: u64 = 20_000;

fn checkpoint_figures() {
    use chatlog_raft::chat::index_chunks::{self, ChunkRegion};
    use chatlog_raft::chat::{ChatKind, Command, GroupState, Outcome};
    let sizes: Vec<u64> = std::env::var("CHATLOG_CHECKPOINT_EVENTS_M")
        .unwrap_or_else(|_| "1,10".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    for millions in sizes {
        let events = millions * 1_000_000;
        let mut st = GroupState::new(1);
        let Outcome::UserCreated { user } = st.apply(
            &Command::CreateUser {
                name: "ann".into(),
                login_token_hash: [1; 32],
            },
            1,
            1,
            0,
        ) else {
            panic!("user")
        };
        // 64 chats, the posts spread over them.
        let chats: Vec<u64> = (0..64)
            .map(|i| {
                match st.apply(
                    &Command::CreateChat {
                        creator: user,
                        kind: ChatKind::Group,
                        title: format!("c{i}"),
                        members: vec![],
                    },
                    2,
                    2,
                    i,
                ) {
                    Outcome::Event { chat, .. } => chat,
                    o => panic!("{o:?}"),
                }
            })
            .collect();
        let mut index = 2u64;
        let mut cmid = 0u64;
        let mut post_entries = |st: &mut GroupState, entries: u64, index: &mut u64| {
            for _ in 0..entries {
                *index += 1;
                for pos in 0..POSTS_PER_ENTRY as usize {
                    cmid += 1;
                    let o = st.apply(
                        &Command::Post {
                            chat: chats[(cmid % 64) as usize],
                            sender: user,
                            client_message_id: cmid,
                            text: "x".into(),
                            media: None,
                            reply_to: 0,
                        },
                        // A second per entry: the dedupe window holds 900 entries' posts.
                        *index * 1_000,
                        *index,
                        pos,
                    );
                    debug_assert!(matches!(o, Outcome::Event { .. }));
                }
            }
        };
        post_entries(&mut st, events / POSTS_PER_ENTRY, &mut index);
        let before = ChunkRegion::of(index, 0);
        post_entries(&mut st, CHECKPOINT_EVERY_ENTRIES, &mut index);
        let after = ChunkRegion::of(index, 0);
        let mut whole_ms = Vec::new();
        let mut incremental_ms = Vec::new();
        let (mut whole_bytes, mut incremental_bytes) = (0, 0);
        for _ in 0..3 {
            let started = Instant::now();
            whole_bytes = st.encode().len();
            whole_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let (_, rest) = index_chunks::encode_outside(&st, index);
            let new: usize = (before.end..after.end)
                .map(|k| index_chunks::encode_chunk(&st, k).len())
                .sum();
            incremental_bytes = rest.len() + new;
            incremental_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "checkpoint at {}M indexed events ({index} entries): whole encode median {:.1} ms \
             ({whole_bytes} bytes); incremental after {CHECKPOINT_EVERY_ENTRIES} more entries \
             median {:.1} ms ({incremental_bytes} bytes, chunks {}..{} new)",
            st.events_applied() / 1_000_000,
            median(whole_ms),
            median(incremental_ms),
            before.end,
            after.end
        );
    }
}

async fn run() {
    let total = env_u64("CHATLOG_SNAPSHOT_MB", 1024) << 20;
    let repeats = env_u64("CHATLOG_SNAPSHOT_REPEATS", 3).max(1);
    let root = tempfile::tempdir_in(
        std::env::var("CHATLOG_SNAPSHOT_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().to_string_lossy().into_owned()),
    )
    .expect("a temp dir");
    let sender_engine = engine(&root.path().join("sender"));
    let mut sender = LogStore::open(Arc::clone(&sender_engine), GROUP).expect("log store");
    let started = Instant::now();
    let last = fill(&mut sender, total).await;
    eprintln!(
        "sender log: {last} entries of {ENTRY_BYTES} bytes written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let reader = sender.get_log_reader().await;
    let meta = meta(last);
    chatlog_raft::state_machine::write_incremental_checkpoint(
        &sender_engine,
        GROUP,
        &meta,
        &chatlog_raft::chat::GroupState::new(GROUP),
    )
    .await
    .expect("the sender's checkpoint");
    let cp = CheckpointHandle::durable(Arc::clone(&sender_engine), GROUP, Arc::default())
        .expect("reads the pointer")
        .expect("an incremental checkpoint");
    let (mut transfers, mut installs) = (Vec::new(), Vec::new());
    for repeat in 0..repeats {
        let dir = root.path().join(format!("receiver-{repeat}"));
        let receiver_engine = engine(&dir);
        let mut receiver = LogStore::open(Arc::clone(&receiver_engine), GROUP).expect("log store");
        let receiver_reader = receiver.get_log_reader().await;
        let mut receiver_sm =
            ChatStateMachine::open(Arc::clone(&receiver_engine), GROUP, SmConfig::default())
                .expect("the receiver's state machine")
                .with_log(receiver_reader.clone());
        let staging = receiver_sm.staging().expect("staging");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (done_tx, mut done_rx) = mpsc::channel(1);
        let server = tokio::spawn(serve(listener, Arc::clone(&staging), done_tx));
        let (frames, pending) = connect(addr).await;
        let next_id = std::sync::atomic::AtomicU64::new(1);
        let call = |body: Bytes, _wait: Duration| {
            let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (answer_tx, answer_rx) = oneshot::channel();
            pending.lock().unwrap().insert(id, answer_tx);
            let frames = frames.clone();
            async move {
                frames
                    .send((id, body))
                    .await
                    .map_err(|_| "connection closed")?;
                answer_rx.await.map_err(|_| "no answer")
            }
        };
        let snapshot = Snapshot {
            meta: meta.clone(),
            snapshot: SnapshotData::Local(LocalSnapshot {
                checkpoint: cp.clone(),
                log: Some(reader.clone()),
                upto: last,
            }),
        };
        let started = Instant::now();
        snapshot_stream::send(
            GROUP,
            Vote::new(1, 1),
            snapshot,
            snapshot_stream::chunk_bytes(),
            call,
        )
        .await
        .unwrap_or_else(|e| panic!("the transfer fails: {e:?}"));
        let transfer = started.elapsed();
        let staged = done_rx.recv().await.expect("a staged snapshot");
        let SnapshotData::Staged(staged) = staged.snapshot else {
            panic!("a staged snapshot")
        };
        let started = Instant::now();
        receiver_sm
            .install_snapshot(&meta, SnapshotData::Staged(staged))
            .await
            .expect("installs");
        let install = started.elapsed();
        for index in [1, last] {
            let got = receiver_reader
                .read_history(index, index + 1)
                .expect("reads");
            assert_eq!(
                got.first().map(|e| e.log_id),
                Some(log_id(1, 1, index)),
                "the receiver's log holds the range's entry {index}"
            );
        }
        let stream_mb = total as f64 / 1e6;
        let (t, i) = (
            stream_mb / transfer.as_secs_f64(),
            stream_mb / install.as_secs_f64(),
        );
        println!(
            "repeat {repeat}: {stream_mb:.0} MB streamed in {:.2} s ({t:.0} MB/s), installed in {:.2} s ({i:.0} MB/s)",
            transfer.as_secs_f64(),
            install.as_secs_f64()
        );
        transfers.push(t);
        installs.push(i);
        server.abort();
        drop((receiver_sm, staging, receiver, receiver_reader));
        close(receiver_engine);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "snapshot stream, {} MiB retained, chunk {} bytes: transfer median {:.0} MB/s, install median {:.0} MB/s ({repeats} repeats)",
        total >> 20,
        snapshot_stream::chunk_bytes(),
        median(transfers),
        median(installs)
    );
    drop((reader, sender));
    close(sender_engine);
}
