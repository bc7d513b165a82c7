//! chatlog-raft: replicated chat logs. openraft glue over `chatlog-storage`.
//!
//! What it owns: the openraft type configuration (`types`, the only module that names
//! openraft's generic types), where a group's Raft state lives in the node's one storage
//! engine (`ids`) and its bytes (`codec`), the per-group Raft log store (`log_store`)
//! and state machine (`state_machine`), snapshots of any size streamed between replicas
//! and installed crash-safely (`snapshot_stream`), and the node-to-node transport
//! (`network`: one TCP connection per peer node shared by every group); the rest is in
//! `ARCHITECTURE.md` and `raft/PLAN.md`. What it must not do: know about
//! clients, sessions or the gateway protocol.
//!
//! Architecture invariant: one `chatlog_storage::Engine` per node is shared by every
//! group; a group's log store never waits for an fdatasync of its own in `append`.

pub mod chat;
pub mod chat_list_drain;
pub mod checkpoint_chunks;
pub mod checkpointer;
pub mod clock;
pub mod codec;
pub mod controller;
pub mod damage_watch;
pub mod error;
pub mod feed;
pub mod ids;
pub mod log_store;
pub mod network;
pub mod node;
pub mod proposer;
pub mod repair;
pub mod replica_drop;
pub mod retention;
pub mod runtime;
pub mod secret_log;
pub mod snapshot_stream;
pub mod state_machine;
pub mod types;
pub mod vote_probe;

pub use error::{Error, Result};
pub use log_store::{LogReader, LogStore};
pub use network::{GroupDirectory, NetworkFactory, NodeIdentity, Router, serve};
pub use state_machine::{ChatSnapshotBuilder, ChatStateMachine};
pub use types::{ChatBatch, ChatBatchReply, GroupId, NodeId, TypeConfig};

/// A Raft group handle as chatlog runs it.
pub type ChatRaft = openraft::Raft<TypeConfig, ChatStateMachine>;
