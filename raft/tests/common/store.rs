//! A log store on a real engine (1 MiB segments) in a test's directory, opened and closed
//! the same way by the log-store tests (`log_store.rs`, `move_back.rs`).
//!
//! What it owns: opening an engine with one group's store, and closing both cleanly. What
//! it must not do: hide an engine that stays shared (a close that cannot get the only
//! handle panics).
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use chatlog_raft::{GroupId, LogStore};
use chatlog_storage::{Config, Engine};

/// An engine in `dir` and group `group`'s log store on it.
pub fn open(dir: &Path, group: GroupId) -> (Arc<Engine>, LogStore) {
    let mut config = Config::new(dir);
    config.segment_bytes = 1 << 20;
    let engine = Arc::new(Engine::open(config).expect("engine opens"));
    let store = LogStore::open(Arc::clone(&engine), group).expect("log store opens");
    (engine, store)
}

/// Drops the store and closes the engine, checking it stopped cleanly. Every reader of
/// the store must be dropped first.
pub fn close(engine: Arc<Engine>, store: LogStore) {
    drop(store);
    let engine = only_handle(engine).expect("the store held the only other handle");
    engine.close().expect("engine closes cleanly");
}

/// The engine once no log store holds it: a dropped store's "synced" marker writer
/// (`chatlog_raft::repair`) lets go of it when it next runs (on another worker thread).
pub fn only_handle(mut engine: Arc<Engine>) -> Result<Engine, Arc<Engine>> {
    for _ in 0..500 {
        match Arc::try_unwrap(engine) {
            Ok(e) => return Ok(e),
            Err(shared) => engine = shared,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(engine)
}
