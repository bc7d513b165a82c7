//! What the conformance suite does not exercise: normal (chat batch) entries, reading
//! entries before they are durable, and everything surviving a restart of the engine.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chatlog_raft::types::{Entry, EntryPayload, LogId, Membership, Vote, log_id};
use chatlog_raft::{ChatBatch, GroupId, LogStore, TypeConfig};
use chatlog_storage::Engine;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage, RaftLogStorageExt};
use openraft::type_config::TypeConfigExt;

const GROUP: GroupId = 3;

#[path = "common/store.rs"]
mod store;
use store::close;

fn open(dir: &Path) -> (Arc<Engine>, LogStore) {
    store::open(dir, GROUP)
}

fn normal(term: u64, index: u64, body: &str) -> Entry {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(ChatBatch(Bytes::from(body.to_string()))),
    }
}

fn membership(term: u64, index: u64, voters: &[u64]) -> Entry {
    let voters: BTreeSet<u64> = voters.iter().copied().collect();
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Membership(Membership::new_with_defaults(vec![voters], [])),
    }
}

async fn read_all(store: &mut LogStore) -> Vec<Entry> {
    let mut reader = store.get_log_reader().await;
    reader.try_get_log_entries(0..).await.expect("reads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let entries = vec![
        membership(1, 0, &[1, 2, 3]),
        normal(1, 1, "one"),
        normal(1, 2, "two"),
        normal(2, 3, "three"),
        normal(2, 4, "four"),
        normal(2, 5, "five"),
    ];
    let vote = Vote::new_committed(2, 1);
    let committed: LogId = log_id(2, 1, 4);
    let purged: LogId = log_id(1, 1, 1);
    {
        let (engine, mut store) = open(dir.path());
        store
            .blocking_append(entries.clone())
            .await
            .expect("appends");
        store.save_vote(&vote).await.expect("saves vote");
        store
            .save_committed(Some(committed))
            .await
            .expect("saves committed");
        store.purge(purged).await.expect("purges");
        close(engine, store);
    }
    let (engine, mut store) = open(dir.path());
    let state = store.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(purged));
    assert_eq!(state.last_log_id, Some(log_id(2, 1, 5)));
    assert_eq!(
        store.read_committed().await.expect("committed"),
        Some(committed)
    );
    let mut reader = store.get_log_reader().await;
    assert_eq!(reader.read_vote().await.expect("vote"), Some(vote));
    drop(reader);
    assert_eq!(read_all(&mut store).await, entries[2..].to_vec());
    // The log continues where it ended.
    store
        .blocking_append([normal(3, 6, "six")])
        .await
        .expect("appends after restart");
    assert_eq!(read_all(&mut store).await.len(), 5);
    close(engine, store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_entries_are_readable_before_their_flush_is_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (engine, mut store) = open(dir.path());
    let mut reader = store.get_log_reader().await;
    let mut expected = Vec::new();
    let mut pending = Vec::new();
    // Many appends in a row without waiting: later ones are submitted while earlier ones
    // are still being synced, so reads mix durable entries and the unflushed tail.
    for index in 0..200u64 {
        let entry = normal(1, index, &format!("message {index}"));
        expected.push(entry.clone());
        let (tx, rx) = TypeConfig::oneshot();
        store
            .append([entry], IOFlushed::signal(tx))
            .await
            .expect("append is accepted");
        pending.push(rx);
        let got = reader
            .try_get_log_entries(0..=index)
            .await
            .expect("reads right after append");
        assert_eq!(got, expected, "after appending {index}");
    }
    for rx in pending {
        let flushed: Result<(), io::Error> = rx.await.expect("callback is called");
        flushed.expect("flush succeeds");
    }
    assert_eq!(read_all(&mut store).await, expected);
    // An empty append still gets its flush report (queued behind earlier writes).
    let (tx, rx) = TypeConfig::oneshot();
    store
        .append(Vec::<Entry>::new(), IOFlushed::signal(tx))
        .await
        .expect("empty append is accepted");
    let flushed: Result<(), io::Error> = rx.await.expect("callback is called");
    flushed.expect("empty flush succeeds");
    drop(reader);
    close(engine, store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_then_append_replaces_the_suffix() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (engine, mut store) = open(dir.path());
        let first: Vec<Entry> = (0..6).map(|i| normal(1, i, "old")).collect();
        store.blocking_append(first.clone()).await.expect("appends");
        store
            .truncate_after(Some(log_id(1, 1, 2)))
            .await
            .expect("truncates");
        let replacement: Vec<Entry> = (3..5).map(|i| normal(2, i, "new")).collect();
        store
            .blocking_append(replacement.clone())
            .await
            .expect("appends after truncation");
        let mut expected = first[..3].to_vec();
        expected.extend(replacement);
        assert_eq!(read_all(&mut store).await, expected);
        close(engine, store);
    }
    let (engine, mut store) = open(dir.path());
    let got = read_all(&mut store).await;
    assert_eq!(got.len(), 5);
    assert_eq!(got[4].log_id, log_id(2, 1, 4));
    // Truncating everything, then starting again at 0.
    store.truncate_after(None).await.expect("truncates all");
    assert!(read_all(&mut store).await.is_empty());
    store
        .blocking_append([normal(3, 0, "again")])
        .await
        .expect("appends at 0");
    assert_eq!(read_all(&mut store).await.len(), 1);
    close(engine, store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_appends_are_split_and_limited_reads_return_a_prefix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (engine, mut store) = open(dir.path());
    // 12 entries of 512 KiB in one append: over the engine's batch limit with 1 MiB
    // segments, so the append goes out as several batches with one flush report.
    let body = "x".repeat(512 << 10);
    let entries: Vec<Entry> = (0..12).map(|i| normal(1, i, &body)).collect();
    assert!(12 * body.len() > engine.write_batch_bytes_max());
    store
        .blocking_append(entries.clone())
        .await
        .expect("appends");
    assert_eq!(read_all(&mut store).await, entries);
    // The replication read limit (4 MiB) cuts the range after 8 entries.
    let mut reader = store.get_log_reader().await;
    let got = reader.limited_get_log_entries(0, 12).await.expect("reads");
    assert_eq!(got, entries[..8].to_vec());
    let got = reader.limited_get_log_entries(11, 12).await.expect("reads");
    assert_eq!(got.len(), 1);
    drop(reader);
    close(engine, store);
}

/// Issue 9: an entry of an older term read back at the right index (a stale copy the
/// engine serves after a truncation) is an error, never data for replication or apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_of_an_older_term_is_refused_on_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (engine, mut store) = open(dir.path());
    let entries: Vec<Entry> = (1..=5).map(|i| normal(2, i, &format!("new {i}"))).collect();
    store
        .blocking_append(entries.clone())
        .await
        .expect("appends");
    assert_eq!(read_all(&mut store).await, entries);
    // Behind the store's back, make the engine hold term-1 copies of entries 3..=5, as a
    // stale read after a truncation would return them.
    let log = chatlog_raft::ids::raft_log(GROUP).expect("group id");
    let mut batch = chatlog_storage::WriteBatch::new();
    batch.truncate_after(log, chatlog_raft::ids::engine_index(2));
    for i in 3..=5 {
        let stale = normal(1, i, &format!("old {i}"));
        batch.append(
            log,
            chatlog_raft::ids::engine_index(i),
            &chatlog_raft::codec::encode_entry(&stale),
        );
    }
    engine.write(&batch).await.expect("engine write");
    let mut reader = store.get_log_reader().await;
    let err = reader
        .try_get_log_entries(1..=5)
        .await
        .expect_err("a stale entry must not be returned");
    assert!(
        err.to_string().contains("log entry read at index 3"),
        "unexpected error: {err}"
    );
    // Entries before the stale ones still read fine.
    assert_eq!(
        reader.try_get_log_entries(1..3).await.expect("reads"),
        entries[..2].to_vec()
    );
    drop(reader);
    close(engine, store);
}

/// Retention (s5retain): a purge is logical up to the retain mark — openraft no longer
/// sees purged entries, history reads still do — and physical below it; a snapshot's
/// range replaces a log far behind; all of it survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_keep_history_above_the_retain_mark() {
    let dir = tempfile::tempdir().expect("temp dir");
    let entries: Vec<Entry> = (1..=10).map(|i| normal(1, i, &format!("e{i}"))).collect();
    let indexes = |v: &[Entry]| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    {
        let (engine, mut store) = open(dir.path());
        store
            .blocking_append(entries.clone())
            .await
            .expect("appends");
        let reader = store.get_log_reader().await;
        reader.set_retain_from(4);
        store.purge(log_id(1, 1, 6)).await.expect("purges");
        // Openraft sees 7..=10; history reads 4..=10; 1..=3 are gone from disk.
        assert_eq!(indexes(&read_all(&mut store).await), vec![7, 8, 9, 10]);
        let history = reader.read_history(0, 11).expect("history");
        assert_eq!(indexes(&history), (4..=10).collect::<Vec<_>>());
        assert_eq!(history, entries[3..].to_vec(), "byte-exact");
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 6)));
        // A snapshot carries the held range up to its index.
        let range = reader.snapshot_range(8, usize::MAX).expect("range");
        assert_eq!(range.len(), 5, "entries 4..=8");
        // Later retention deletes history below a new horizon, never above the mark.
        reader.set_retain_from(6);
        reader.purge_history_below(9).await.expect("purges history");
        assert_eq!(
            indexes(&reader.read_history(0, 11).unwrap()),
            (6..=10).collect::<Vec<_>>()
        );
        drop(reader);
        close(engine, store);
    }
    {
        // After a restart: same views.
        let (engine, mut store) = open(dir.path());
        let reader = store.get_log_reader().await;
        assert_eq!(indexes(&read_all(&mut store).await), vec![7, 8, 9, 10]);
        assert_eq!(
            indexes(&reader.read_history(0, 11).unwrap()),
            (6..=10).collect::<Vec<_>>()
        );
        // A snapshot at 40 with entries 30..=40 (this log is far behind): the log holds
        // them as history once openraft purges up to the snapshot, and appends go on.
        let snap: Vec<Entry> = (30..=40).map(|i| normal(2, i, &format!("s{i}"))).collect();
        reader.install_range(snap.clone()).await.expect("installs");
        store
            .purge(log_id(2, 1, 40))
            .await
            .expect("purges to the snapshot");
        assert_eq!(read_all(&mut store).await, Vec::<Entry>::new());
        assert_eq!(reader.read_history(0, 100).unwrap(), snap);
        store
            .blocking_append(vec![normal(2, 41, "after")])
            .await
            .expect("appends");
        assert_eq!(indexes(&read_all(&mut store).await), vec![41]);
        assert_eq!(
            indexes(&reader.read_history(0, 100).unwrap()),
            (30..=41).collect::<Vec<_>>()
        );
        drop(reader);
        close(engine, store);
    }
    {
        let (engine, mut store) = open(dir.path());
        let reader = store.get_log_reader().await;
        assert_eq!(indexes(&read_all(&mut store).await), vec![41]);
        assert_eq!(
            indexes(&reader.read_history(0, 100).unwrap()),
            (30..=41).collect::<Vec<_>>()
        );
        drop(reader);
        close(engine, store);
    }
}

/// A snapshot being streamed pins the entries it has not sent yet: neither openraft's
/// purge nor retention's deletes them until the pin moves past them or is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_pin_holds_entries_against_purges() {
    let dir = tempfile::tempdir().expect("temp dir");
    let entries: Vec<Entry> = (1..=10).map(|i| normal(1, i, &format!("e{i}"))).collect();
    let indexes = |v: &[Entry]| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    let (engine, mut store) = open(dir.path());
    store.blocking_append(entries).await.expect("appends");
    let reader = store.get_log_reader().await;
    reader.set_retain_from(9);
    let mut pin = reader.pin_history(3);
    store.purge(log_id(1, 1, 6)).await.expect("purges");
    let history = |r: &chatlog_raft::LogReader| indexes(&r.read_history(0, 11).unwrap());
    assert_eq!(history(&reader), (3..=10).collect::<Vec<_>>());
    reader.purge_history_below(8).await.expect("purges history");
    assert_eq!(history(&reader), (3..=10).collect::<Vec<_>>(), "pinned");
    pin.advance(5);
    reader.purge_history_below(8).await.expect("purges history");
    assert_eq!(
        history(&reader),
        (5..=10).collect::<Vec<_>>(),
        "up to the pin"
    );
    drop(pin);
    reader.purge_history_below(8).await.expect("purges history");
    // History (at or below the purge mark 6) is gone; 7.. is the log openraft sees.
    assert_eq!(history(&reader), (7..=10).collect::<Vec<_>>(), "unpinned");
    drop(reader);
    close(engine, store);
}

/// s8retention: a history read that hits damaged bytes fails with an error that says so
/// (`Error::is_damage`, which the gateway answers as UNAVAILABLE naming the damage), not
/// with bytes and not as an internal error. One byte of an entry's record is flipped on
/// disk (in a sealed segment) while the engine runs, after a restart (nothing of it is
/// cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_read_of_damaged_bytes_is_a_damage_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    // 40 entries of 64 KiB: the 1 MiB segment holding entry 5 is sealed (read from its
    // file, not from the active segment's memory).
    // Printable noise, so the engine's compression leaves the bytes as they are.
    let marker = |i: u64| {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let noise: String = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'0' + (x % 75) as u8)
            })
            .collect();
        format!("damage-me-{i:04}-{noise}")
    };
    let entries: Vec<Entry> = (1..=40).map(|i| normal(1, i, &marker(i))).collect();
    {
        let (engine, mut store) = open(dir.path());
        store.blocking_append(entries).await.expect("appends");
        close(engine, store);
    }
    let (engine, mut store) = open(dir.path());
    let reader = store.get_log_reader().await;
    // Flip a byte of entry 5's body in whichever file holds it.
    let needle = "damage-me-0005-";
    let mut flipped = false;
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            // Files the engine replaces meanwhile (its checkpoint) may be gone.
            let Ok(mut bytes) = std::fs::read(&p) else {
                continue;
            };
            if let Some(at) = bytes
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
            {
                bytes[at + 3] ^= 0x10;
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .expect("open");
                f.write_all_at(&bytes[at + 3..at + 4], (at + 3) as u64)
                    .expect("flip");
                f.sync_all().expect("sync");
                flipped = true;
            }
        }
    }
    assert!(flipped, "entry 5's bytes are on disk");
    let err = reader
        .read_history(1, 41)
        .expect_err("a read over damaged bytes fails");
    assert!(err.is_damage(), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    drop(reader);
    drop(store);
    drop(engine);
}
