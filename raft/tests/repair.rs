//! Issue 9, a damaged replica's log at the log-store level (`chatlog_raft::repair`): a
//! flipped byte in the record holding a group's last entries, with the "synced" marker
//! and a newer vote written after it, is cut by the engine
//! (`RecoveryMode::CutDamagedTail`); the store opens damaged (required index = what the
//! dropped records vouched for), saves the vote the dropped records held, and stays
//! damaged across a second restart before repair (the required index was made the
//! marker); entries sent again make it sound, durably.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_raft::repair::{META_SYNCED, decode_synced};
use chatlog_raft::types::{Entry, EntryPayload, Vote, log_id};
use chatlog_raft::{ChatBatch, GroupId, LogStore};
use chatlog_storage::format::{
    BatchBody, OpKind, RECORD_HEADER_BYTES, RecordHeader, SEGMENT_HEADER_BYTES, SegmentHeader,
    decode_body,
};
use chatlog_storage::{Config, Engine, RecoveryMode};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt};

const GROUP: GroupId = 3;

fn open(dir: &Path) -> (Arc<Engine>, LogStore) {
    let mut config = Config::new(dir);
    config.segment_bytes = 1 << 20;
    config.recovery_mode = RecoveryMode::CutDamagedTail;
    let engine = Arc::new(Engine::open(config).expect("engine opens"));
    let store = LogStore::open(Arc::clone(&engine), GROUP).expect("log store opens");
    (engine, store)
}

/// Drops the store and closes the engine once the store's marker writer let go of it.
fn close(mut engine: Arc<Engine>, store: LogStore) {
    drop(store);
    for _ in 0..500 {
        match Arc::try_unwrap(engine) {
            Ok(e) => return e.close().expect("engine closes"),
            Err(shared) => engine = shared,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the engine is still shared");
}

fn entries(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    indexes
        .map(|i| Entry {
            log_id: log_id(term, 1, i),
            payload: EntryPayload::Normal(ChatBatch(Bytes::from(format!("t{term} i{i}")))),
        })
        .collect()
}

/// Offset of the last valid record in `path` that appends the group's Raft log entry
/// `raft_index`, and its length.
fn record_with(path: &Path, raft_index: u64) -> (usize, usize) {
    let log = chatlog_raft::ids::raft_log(GROUP).expect("a log");
    let engine_index = chatlog_raft::ids::engine_index(raft_index);
    let bytes = std::fs::read(path).unwrap();
    let salt = SegmentHeader::decode(&bytes).unwrap().salt;
    let mut at = SEGMENT_HEADER_BYTES;
    let mut found = None;
    while let Some(h) = bytes.get(at..).and_then(|b| RecordHeader::decode(salt, b)) {
        let start = at + RECORD_HEADER_BYTES;
        let raw = decode_body(
            &h,
            Bytes::copy_from_slice(&bytes[start..start + h.body_len as usize]),
        )
        .unwrap();
        if let Ok(body) = BatchBody::parse(raw) {
            for k in 0..body.op_count() {
                let op = body.op(k);
                if op.kind == OpKind::Append
                    && op.log_id == log
                    && (op.index..op.index + u64::from(op.count)).contains(&engine_index)
                {
                    found = Some((at, h.record_bytes()));
                }
            }
        }
        at += h.record_bytes();
    }
    found.expect("a record holding the entry")
}

/// Waits (up to 10 s) until the marker writer has vouched for entry `index` of `log`.
async fn wait_marker(engine: &Engine, log: u64, index: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine
        .meta(log, META_SYNCED)
        .and_then(|b| decode_synced(&b))
        < Some(index)
    {
        assert!(Instant::now() < deadline, "no marker for entry {index}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Flips one bit in the middle of the body of the record holding entry `index` in the
/// first segment file under `dir`.
fn flip_record_holding(dir: &Path, index: u64) {
    let seg = dir.join(format!("{:016x}.seg", 1));
    let (at, len) = record_with(&seg, index);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[at + RECORD_HEADER_BYTES + (len - RECORD_HEADER_BYTES) / 2] ^= 0x08;
    std::fs::write(&seg, &bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_keeps_its_vote_stays_damaged_until_repaired_and_then_is_sound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = chatlog_raft::ids::raft_log(GROUP).expect("a log");
    let newer_vote = Vote::new_committed(2, 1);
    {
        let (engine, mut store) = open(dir.path());
        store.blocking_append(entries(1, 1..=10)).await.unwrap();
        store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        store.blocking_append(entries(1, 11..=20)).await.unwrap();
        store.save_vote(&newer_vote).await.unwrap();
        // The marker writer vouches for entry 20 in a record of its own.
        wait_marker(&engine, log, 20).await;
        close(engine, store);
    }
    flip_record_holding(dir.path(), 15);

    let held;
    {
        let (engine, mut store) = open(dir.path());
        assert!(engine.damage().is_some(), "the flip is cut as damage");
        let damage = store.repair_status().damage().expect("the log is damaged");
        assert!(damage.required_index >= 20, "{damage}");
        assert!(damage.held_index < 15, "{damage}");
        assert!(damage.detail.contains(".seg"), "{damage}");
        held = damage.held_index;
        // The vote only the dropped records held is back.
        let mut reader = store.get_log_reader().await;
        assert_eq!(reader.read_vote().await.unwrap(), Some(newer_vote));
        drop(reader);
        store.persist_recovered_state().await.unwrap();
        close(engine, store);
    }
    {
        // Crashed again before repair: the proof is sealed off, the marker still says it.
        let (engine, mut store) = open(dir.path());
        assert!(engine.damage().is_none());
        let damage = store.repair_status().damage().expect("still damaged");
        assert!(damage.required_index >= 20, "{damage}");
        let mut reader = store.get_log_reader().await;
        assert_eq!(reader.read_vote().await.unwrap(), Some(newer_vote));
        drop(reader);
        // The leader it voted for (term 2) sends the lost range again; once durable
        // through the required index, the log is sound.
        let status = store.repair_status();
        store
            .blocking_append(entries(2, held + 1..=damage.required_index - 1))
            .await
            .unwrap();
        assert!(status.is_repairing(), "not yet at the required index");
        store
            .blocking_append(entries(
                2,
                damage.required_index..=damage.required_index + 2,
            ))
            .await
            .unwrap();
        assert!(!status.is_repairing(), "repaired: {:?}", status.damage());
        close(engine, store);
    }
    let (engine, store) = open(dir.path());
    assert!(
        store.repair_status().damage().is_none(),
        "sound after a restart"
    );
    close(engine, store);
}

/// Session 6, liveness: a repair also ends, below the required index, once an entry of a
/// term newer than the replica's vote when the damage was found is durable (a newer
/// leader's log, which holds everything that could have been committed of what was lost,
/// now matches this one through that entry; `chatlog_raft::repair`, "When a repair
/// ends"). Entries of the vote's own term do not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_ends_below_the_required_index_once_a_newer_term_is_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = chatlog_raft::ids::raft_log(GROUP).expect("a log");
    {
        let (engine, mut store) = open(dir.path());
        store.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        store.blocking_append(entries(2, 1..=20)).await.unwrap();
        wait_marker(&engine, log, 20).await;
        close(engine, store);
    }
    flip_record_holding(dir.path(), 15);

    let (engine, mut store) = open(dir.path());
    let damage = store.repair_status().damage().expect("the log is damaged");
    let held = damage.held_index;
    assert!(damage.required_index >= 20 && held < 15, "{damage}");
    store.persist_recovered_state().await.unwrap();
    let status = store.repair_status();
    // The same term's leader sends one entry: not enough.
    store
        .blocking_append(entries(2, held + 1..=held + 1))
        .await
        .unwrap();
    assert!(status.is_repairing(), "an entry of the vote's own term");
    // A newer leader (term 3; its vote saved first, as openraft does) appends its first
    // entry right after: the repair ends though the log is below the required index.
    store.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
    store
        .blocking_append(entries(3, held + 2..=held + 2))
        .await
        .unwrap();
    assert!(held + 2 < damage.required_index);
    assert!(
        !status.is_repairing(),
        "a durable entry of a newer term ends the repair: {:?}",
        status.damage()
    );
    close(engine, store);
}

/// Session 7, the idle-group case: a replica whose damaged log required more than the
/// current leader's log holds (it had entries of an older term beyond it, never
/// committed) stays repairing; a probe of every voter (`chatlog_raft::vote_probe`) lowers
/// the required index to the leader's last index with the probe's term, and the repair
/// ends at once on the log as it stands only if its last durable entry is of that term or
/// later — a stale entry of an older term does not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_ends_a_lasting_repair_at_the_leaders_last_index() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = chatlog_raft::ids::raft_log(GROUP).expect("a log");
    {
        let (engine, mut store) = open(dir.path());
        store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        store.blocking_append(entries(1, 1..=10)).await.unwrap();
        store.blocking_append(entries(1, 11..=20)).await.unwrap();
        wait_marker(&engine, log, 20).await;
        close(engine, store);
    }
    flip_record_holding(dir.path(), 15);
    let (engine, mut store) = open(dir.path());
    let damage = store.repair_status().damage().expect("the log is damaged");
    let held = damage.held_index;
    assert!(
        damage.required_index >= 20 && (10..15).contains(&held),
        "{damage}"
    );
    store.persist_recovered_state().await.unwrap();
    let status = store.repair_status();
    let reader = store.get_log_reader().await;
    // A probe answering term 2 (a newer leader whose log ends at `held`): the log's last
    // entry is of term 1, so lowering does not end the repair.
    assert!(status.lower_required(held, 2));
    reader.recheck_repair();
    assert!(
        status.is_repairing(),
        "a stale entry of term 1 does not end it"
    );
    // Lowering never raises, and a second probe term does not lower what is lower.
    assert!(!status.lower_required(held + 5, 2));
    // The leader of term 2 sends its entry at held + 1 (its vote saved first): the log
    // now ends with the probed term's entry, beyond the lowered index: repaired.
    store.save_vote(&Vote::new_committed(2, 2)).await.unwrap();
    store
        .blocking_append(entries(2, held + 1..=held + 1))
        .await
        .unwrap();
    assert!(
        !status.is_repairing(),
        "the probed leader's entry ends the repair: {:?}",
        status.damage()
    );
    drop(reader);
    close(engine, store);

    // The same at once, on an idle log that already ends with the probed term's entry.
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (engine, mut store) = open(dir.path());
        store.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        store.blocking_append(entries(2, 1..=10)).await.unwrap();
        store.blocking_append(entries(2, 11..=20)).await.unwrap();
        wait_marker(&engine, log, 20).await;
        close(engine, store);
    }
    flip_record_holding(dir.path(), 15);
    let (engine, mut store) = open(dir.path());
    let damage = store.repair_status().damage().expect("the log is damaged");
    let held = damage.held_index;
    assert!((10..15).contains(&held), "{damage}");
    store.persist_recovered_state().await.unwrap();
    let status = store.repair_status();
    let reader = store.get_log_reader().await;
    // Term 2's leader (the one it voted for) has only `held` entries: the repair would
    // wait for the log to grow past the required index; the probe ends it now.
    assert!(status.lower_required(held, 2));
    assert!(status.is_repairing(), "not before the log is checked");
    reader.recheck_repair();
    assert!(
        !status.is_repairing(),
        "durable through the leader's last index, ending with its term: {:?}",
        status.damage()
    );
    drop(reader);
    close(engine, store);
}
