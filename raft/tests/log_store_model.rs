//! A randomised model check of one group's Raft log over a real engine (small segments,
//! so rotation, index files and compaction happen): appends that are not waited for,
//! conflicting-suffix truncations (what a follower does when a new leader overwrites
//! uncommitted entries), purges, compactions and restarts, in random order; after every
//! step each read must return exactly the model's entries, log ids AND payloads. Every
//! (term, index) has its own payload, so a stale entry of an older term read back at
//! the right index (issue 9: replica divergence) is caught.
//!
//! The seed is printed; `CHATLOG_TEST_SEED=N` repeats a run, `CHATLOG_MODEL_STEPS=N`
//! makes it longer.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chatlog_raft::types::{Entry, EntryPayload, LogId, log_id};
use chatlog_raft::{ChatBatch, GroupId, LogStore};
use chatlog_storage::{Config, Engine};
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage, RaftLogStorageExt};

const GROUP: GroupId = 5;

fn open(dir: &Path) -> (Arc<Engine>, LogStore) {
    let mut config = Config::new(dir);
    config.segment_bytes = 256 << 10; // the smallest the engine accepts
    // Compact anything with dead entries, and only when asked (`compact_now`).
    config.compaction_live_ratio_max = 0.99;
    config.compaction_interval_ms = 3_600_000;
    let engine = Arc::new(Engine::open(config).expect("engine opens"));
    let store = LogStore::open(Arc::clone(&engine), GROUP).expect("log store opens");
    (engine, store)
}

/// A payload unique to `(term, index)`, padded so a few hundred entries fill a segment.
fn entry(term: u64, index: u64) -> Entry {
    let body = format!("term {term} index {index} {}", "x".repeat(700));
    Entry {
        log_id: log_id(term, 1 + term % 3, index),
        payload: EntryPayload::Normal(ChatBatch(Bytes::from(body))),
    }
}

/// xorshift64*: enough randomness for choosing steps, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The model: the log holds `entries` (consecutive), everything at or below `purged` is gone.
struct Model {
    entries: Vec<Entry>,
    purged: Option<LogId>,
    term: u64,
}

impl Model {
    fn next_index(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.log_id.index + 1)
            .or(self.purged.map(|p| p.index + 1))
            .unwrap_or(1)
    }
}

async fn check_reads(store: &mut LogStore, model: &Model, rng: &mut Rng, step: u64, seed: u64) {
    let mut reader = store.get_log_reader().await;
    let all = reader.try_get_log_entries(0..).await.expect("reads");
    assert_eq!(
        all.iter().map(|e| e.log_id).collect::<Vec<_>>(),
        model.entries.iter().map(|e| e.log_id).collect::<Vec<_>>(),
        "seed {seed} step {step}: log ids differ from the model"
    );
    assert_eq!(
        all, model.entries,
        "seed {seed} step {step}: payloads differ"
    );
    if let (Some(first), Some(last)) = (model.entries.first(), model.entries.last()) {
        let (a, b) = (first.log_id.index, last.log_id.index);
        let lo = a + rng.below(b - a + 1);
        let hi = lo + rng.below(b - lo + 1);
        let got = reader.try_get_log_entries(lo..=hi).await.expect("reads");
        let want: Vec<Entry> = model
            .entries
            .iter()
            .filter(|e| (lo..=hi).contains(&e.log_id.index))
            .cloned()
            .collect();
        assert_eq!(got, want, "seed {seed} step {step}: range [{lo}, {hi}]");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_exactly_what_the_log_holds_through_truncations_and_compactions() {
    let seed = std::env::var("CHATLOG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                | 1
        });
    let steps: u64 = std::env::var("CHATLOG_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_500);
    println!("seed {seed} (set CHATLOG_TEST_SEED={seed} to repeat), {steps} steps");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut engine, mut store) = open(dir.path());
    let mut model = Model {
        entries: Vec::new(),
        purged: None,
        term: 1,
    };
    for step in 0..steps {
        match rng.below(100) {
            // Append without waiting for the flush (openraft's normal path).
            0..=54 => {
                if rng.below(8) == 0 {
                    model.term += 1;
                }
                let first = model.next_index();
                let n = 1 + rng.below(6);
                let new: Vec<Entry> = (first..first + n).map(|i| entry(model.term, i)).collect();
                store
                    .append(new.clone(), IOFlushed::noop())
                    .await
                    .expect("appends");
                model.entries.extend(new);
            }
            // A new leader overwrites an uncommitted suffix: truncate, then append entries of
            // a higher term at the same indexes.
            55..=74 => {
                if model.entries.is_empty() {
                    continue;
                }
                let cut = rng.below(model.entries.len().min(12) as u64 + 1) as usize;
                let keep_len = model.entries.len() - cut;
                let keep = if keep_len == 0 {
                    model.purged
                } else {
                    Some(model.entries[keep_len - 1].log_id)
                };
                store.truncate_after(keep).await.expect("truncates");
                model.entries.truncate(keep_len);
                model.term += 1;
                let first = model.next_index();
                let n = rng.below(cut as u64 + 3);
                if n > 0 {
                    let new: Vec<Entry> =
                        (first..first + n).map(|i| entry(model.term, i)).collect();
                    store
                        .append(new.clone(), IOFlushed::noop())
                        .await
                        .expect("appends after a truncation");
                    model.entries.extend(new);
                }
            }
            75..=79 => {
                if model.entries.len() < 40 {
                    continue;
                }
                let k = rng.below((model.entries.len() - 20) as u64) as usize;
                let upto = model.entries[k].log_id;
                store.purge(upto).await.expect("purges");
                model.entries.drain(..=k);
                model.purged = Some(upto);
            }
            80..=86 => {
                let engine = Arc::clone(&engine);
                tokio::task::spawn_blocking(move || engine.compact_now())
                    .await
                    .expect("compaction task")
                    .expect("compacts");
            }
            87..=89 => {
                // Restart: wait for everything, then reopen the same directory.
                store
                    .blocking_append(Vec::<Entry>::new())
                    .await
                    .expect("flushes");
                drop(store);
                let e = only_handle(engine).expect("only handle");
                e.close().expect("engine closes");
                (engine, store) = open(dir.path());
            }
            _ => {}
        }
        check_reads(&mut store, &model, &mut rng, step, seed).await;
    }
    store
        .blocking_append(Vec::<Entry>::new())
        .await
        .expect("flushes");
    drop(store);
    only_handle(engine)
        .expect("only handle")
        .close()
        .expect("engine closes");
}

/// The engine once no log store holds it: a dropped store's "synced" marker writer
/// (`chatlog_raft::repair`) lets go of it when it next runs (on another worker thread).
fn only_handle(mut engine: Arc<Engine>) -> Result<Engine, Arc<Engine>> {
    for _ in 0..500 {
        match Arc::try_unwrap(engine) {
            Ok(e) => return Ok(e),
            Err(shared) => engine = shared,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(engine)
}
