//! Issue 3, a replica that moves away and back: the log store takes entries again after
//! its logs were deleted (`replica_drop::clear_replica_logs`) and after installing a
//! snapshot older than its own purge point. Both need the engine's "reset log start"
//! (storage/FORMAT.md): without it the emptied log continues at its old purge point and
//! the next append is refused ("does not continue the log").

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chatlog_raft::types::{Entry, EntryPayload, log_id};
use chatlog_raft::{ChatBatch, GroupId, LogStore};
use chatlog_storage::{Config, Engine};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt};

const GROUP: GroupId = 5;

#[path = "common/store.rs"]
mod store;
use store::close;

fn open(dir: &Path) -> (Arc<Engine>, LogStore) {
    store::open(dir, GROUP)
}

fn normal(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(ChatBatch(Bytes::from(format!("t{term} e{index}")))),
    }
}

fn indexes(v: &[Entry]) -> Vec<u64> {
    v.iter().map(|e| e.log_id.index).collect()
}

/// A log holding 1..=20 and purged from disk below 15 (retention ran here).
async fn purged_log(store: &mut LogStore) {
    store
        .blocking_append((1..=20).map(|i| normal(1, i)).collect::<Vec<_>>())
        .await
        .expect("appends");
    let reader = store.get_log_reader().await;
    reader.set_retain_from(15);
    store.purge(log_id(1, 1, 16)).await.expect("purges");
    reader
        .purge_history_below(15)
        .await
        .expect("purges history");
    assert_eq!(
        indexes(&reader.read_history(0, 100).unwrap()),
        (15..=20).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_away_and_back_starts_from_an_empty_log_at_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (engine, mut store) = open(dir.path());
    purged_log(&mut store).await;
    close(engine, store);

    // The replica moves away: its node deletes its logs.
    let mut config = Config::new(dir.path());
    config.segment_bytes = 1 << 20;
    let engine = Arc::new(Engine::open(config).expect("engine opens"));
    chatlog_raft::replica_drop::clear_replica_logs(&engine, GROUP)
        .await
        .expect("logs deleted");
    for log in chatlog_raft::ids::group_logs(GROUP) {
        if let Some(b) = engine.bounds(log) {
            assert_eq!((b.first, b.next), (1, 1), "log {log} restarts at 1");
        }
    }
    // It moves back: a new replica, nothing voted, nothing purged; the leader (which
    // never purged) sends its log from index 0.
    let mut store = LogStore::open(Arc::clone(&engine), GROUP).expect("log store opens");
    let state = store.get_log_state().await.expect("state");
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));
    store
        .blocking_append((0..=30).map(|i| normal(2, i)).collect::<Vec<_>>())
        .await
        .expect("the moved-back replica appends from 0");
    let mut reader = store.get_log_reader().await;
    assert_eq!(
        reader.try_get_log_entries(0..31).await.expect("reads"),
        (0..=30).map(|i| normal(2, i)).collect::<Vec<_>>()
    );
    drop(reader);
    close(engine, store);
}

/// A replica dropped by a binary before the reset at drop: its empty Raft log still
/// continues at its old purge point (15), and the leader's snapshot is older (at 8, its
/// range 3..=8: each replica purges by its own checkpoint). The install restarts the log
/// at the range (`log_store::write_staged_range`), and appends continue after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_the_old_purge_point_installs_and_appends_continue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (engine, mut store) = open(dir.path());
    purged_log(&mut store).await;
    close(engine, store);
    let mut config = Config::new(dir.path());
    config.segment_bytes = 1 << 20;
    let engine = Engine::open(config).expect("engine opens");
    let log = chatlog_raft::ids::raft_log(GROUP).unwrap();
    let b = engine.bounds(log).expect("bounds");
    let mut old_drop = chatlog_storage::WriteBatch::new();
    old_drop.truncate_after(log, b.first - 1);
    for key in [
        chatlog_raft::ids::META_VOTE,
        chatlog_raft::ids::META_COMMITTED,
        chatlog_raft::ids::META_PURGED,
        chatlog_raft::repair::META_SYNCED,
    ] {
        old_drop.delete_meta(log, key);
    }
    engine.write_blocking(&old_drop).expect("old drop");
    let b = engine.bounds(log).expect("bounds");
    assert!(
        b.first > 9 && b.first == b.next,
        "empty at the old purge point: {b:?}"
    );
    engine.close().expect("closes");

    let (engine, mut store) = open(dir.path());
    let reader = store.get_log_reader().await;
    let snap: Vec<Entry> = (3..=8).map(|i| normal(2, i)).collect();
    reader.install_range(snap.clone()).await.expect("installs");
    store
        .purge(log_id(2, 1, 8))
        .await
        .expect("purges to the snapshot");
    store
        .blocking_append(vec![normal(2, 9), normal(2, 10)])
        .await
        .expect("appends continue after the snapshot");
    assert_eq!(
        indexes(&reader.read_history(0, 100).unwrap()),
        (3..=10).collect::<Vec<_>>()
    );
    drop(reader);
    close(engine, store);

    let (engine, mut store) = open(dir.path());
    let reader = store.get_log_reader().await;
    let held = reader.read_history(0, 100).unwrap();
    assert_eq!(
        indexes(&held),
        (3..=10).collect::<Vec<_>>(),
        "after a restart"
    );
    assert_eq!(held[..6], snap[..], "byte-exact");
    store
        .blocking_append(vec![normal(2, 11)])
        .await
        .expect("appends after a restart");
    drop(reader);
    close(engine, store);
}
