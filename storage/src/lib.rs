//! chatlog-storage: the multi-log segment engine.
//!
//! One engine per node holds the append-only logs of many owners (one per Raft group).
//! Appends from every log share the active segment file, so one fdatasync makes a whole
//! group commit durable. The engine knows nothing about Raft or chats: a log is a dense
//! sequence of `(index, payload)` entries plus a few small metadata values.
//!
//! What it owns: segment files (`format`, `segment`), the write path (`writer`, `io`),
//! the in-memory index and its on-disk halves (`index`, `idx`, `checkpoint`), recovery
//! (`recovery`) and background maintenance (`maintenance`: index files, checkpoints,
//! freeing and recycling segments, compaction). What it must not do: interpret payloads,
//! or report a write durable before its fdatasync returned.
//!
//! ```no_run
//! # async fn demo() -> chatlog_storage::Result<()> {
//! use chatlog_storage::{Config, Engine, WriteBatch};
//! let engine = Engine::open(Config::new("/tmp/chatlog-demo"))?;
//! let mut batch = WriteBatch::new();
//! batch.append(7, 1, b"hello");
//! batch.append(8, 1, b"world");
//! engine.write(&batch).await?; // durable once this returns
//! assert_eq!(&engine.get(7, 1)?[..], b"hello");
//! # Ok(()) }
//! ```

mod batch;
mod cache;
mod checkpoint;
mod config;
mod damage;
mod engine;
mod error;
pub mod fault;
pub mod format;
mod fs;
pub mod histogram;
mod idx;
mod index;
mod inline;
mod io;
mod loghash;
mod maintenance;
mod recovery;
mod segment;
pub mod timeline;
mod writer;

/// Names a log. The engine gives it no meaning.
pub type LogId = u64;

pub use batch::WriteBatch;
pub use config::{
    Config, EngineThreads, GROUP_RECORDS_MAX, IoBackend, IoMode, META_KEY_BYTES_MAX,
    META_VALUE_BYTES_MAX, Preallocation, RecoveryMode, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
    WRITE_BATCH_BYTES_MAX, WRITE_BATCH_OPS_MAX,
};
pub use damage::{CUT_ATTEMPTS_MAX, DAMAGE_WALK_RECORDS_MAX, Damage, DroppedLog};
pub use engine::{CompactionReport, Durable, Engine, LogBounds, Stats};
pub use error::{Error, Result};
pub use fs::{File, FileSystem, StdFile, StdFileSystem};
pub use histogram::{Histogram, HistogramSnapshot};
