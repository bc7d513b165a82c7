//! openraft's own storage conformance suite (`openraft::testing::log::Suite::test_all`,
//! ~45 cases) against `LogStore` + `ChatStateMachine`. Every case gets a fresh engine in
//! a fresh temporary directory. The suite applies only blank and membership entries (it
//! cannot build a `ChatBatch`); `tests/log_store.rs` covers normal entries and restarts.

use std::io;
use std::path::Path;
use std::sync::Arc;

use chatlog_raft::state_machine::SmConfig;
use chatlog_raft::{ChatStateMachine, GroupId, LogStore, TypeConfig};
use chatlog_storage::{Config, Engine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError};
use tempfile::TempDir;

/// A group id other than 0, so a mistake in the group → engine log mapping shows.
const GROUP: GroupId = 7;

fn engine_config(dir: &Path) -> Config {
    let mut config = Config::new(dir);
    // Small segments: ~45 engines are opened one after another.
    config.segment_bytes = 1 << 20;
    config
}

fn store_error(verb: ErrorVerb, e: impl Into<io::Error>) -> StorageError<TypeConfig> {
    StorageError::from_io_error(ErrorSubject::Store, verb, e.into())
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, ChatStateMachine, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, ChatStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|e| store_error(ErrorVerb::Write, e))?;
        let engine = Engine::open(engine_config(dir.path()))
            .map_err(|e| store_error(ErrorVerb::Read, io::Error::other(e)))?;
        let engine = Arc::new(engine);
        let store = LogStore::open(Arc::clone(&engine), GROUP)
            .map_err(|e| store_error(ErrorVerb::Read, e))?;
        // The store (holding the engine) is dropped before the directory guard.
        let sm = ChatStateMachine::open(engine, GROUP, SmConfig::default())
            .map_err(|e| store_error(ErrorVerb::Read, e))?;
        Ok((dir, store, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_log_storage_conformance_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await
}
