//! "Reset log start" (`WriteBatch::reset_log_start`, storage/FORMAT.md): an empty log may
//! start again at a lower index, a non-empty one may not, and the restarted log survives
//! a reopen (recovery replays the op with the same rule).

use chatlog_storage::{Config, Engine, WriteBatch};

const LOG: u64 = 7;

fn open(dir: &std::path::Path) -> Engine {
    let mut config = Config::new(dir);
    config.segment_bytes = 1 << 20;
    Engine::open(config).expect("engine opens")
}

#[test]
fn an_empty_log_restarts_lower_and_a_non_empty_one_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let mut batch = WriteBatch::new();
    batch.append_many(LOG, 1, (1..=100u64).map(|i| i.to_le_bytes()));
    engine.write_blocking(&batch).unwrap();
    let mut purge = WriteBatch::new();
    purge.purge_before(LOG, 81);
    engine.write_blocking(&purge).unwrap();

    // Not empty: refused, nothing changes.
    let mut refused = WriteBatch::new();
    refused.reset_log_start(LOG, 10);
    let err = engine
        .write_blocking(&refused)
        .expect_err("a non-empty log keeps its start");
    assert!(err.to_string().contains("below the first index"), "{err}");
    let b = engine.bounds(LOG).unwrap();
    assert_eq!((b.first, b.next), (81, 101));

    // Emptied and restarted at 10 in one batch, then appended from 10.
    let mut reset = WriteBatch::new();
    reset.truncate_after(LOG, 80);
    reset.reset_log_start(LOG, 10);
    engine.write_blocking(&reset).unwrap();
    let b = engine.bounds(LOG).unwrap();
    assert_eq!((b.first, b.next), (10, 10));
    let mut append = WriteBatch::new();
    append.append(LOG, 10, b"ten");
    engine.write_blocking(&append).unwrap();
    assert_eq!(engine.get(LOG, 10).unwrap().as_ref(), b"ten");
    // The old entries are gone for good.
    assert!(engine.get(LOG, 90).is_err());
    engine.close().unwrap();

    let engine = open(dir.path());
    let b = engine.bounds(LOG).unwrap();
    assert_eq!((b.first, b.next), (10, 11), "the restart survives a reopen");
    assert_eq!(engine.get(LOG, 10).unwrap().as_ref(), b"ten");
    engine.close().unwrap();
}
