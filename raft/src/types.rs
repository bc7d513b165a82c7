//! The openraft adapter: our `RaftTypeConfig` and the concrete names of every openraft
//! type the rest of the crate uses.
//!
//! What it owns: the choice of node id, node, payload (`D`), reply (`R`), runtime and
//! leader-id flavour, spelled out once so that an openraft upgrade (0.10 is still alpha,
//! see `raft/PLAN.md`, P9) touches this file first. What it must not do: hold logic.
//! Other modules name `LogId`, `Vote`, `Entry`, … from here, never from openraft directly.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Names a node (a process holding one storage engine and many group replicas).
pub type NodeId = u64;

/// Names a Raft group. Chat and user ids carry their group, so routing is a computation.
pub type GroupId = u64;

/// What membership records about a node. Addresses live in the peer table, not in the
/// Raft log, so a node's address can change without a membership change.
pub type Node = openraft::EmptyNode;

openraft::declare_raft_types!(
    /// The openraft type configuration of every chatlog group.
    pub TypeConfig:
        D = ChatBatch,
        R = ChatBatchReply,
        NodeId = u64,
        Node = openraft::EmptyNode,
        // tokio with a generator a simulation can seed (`runtime.rs`, issue 9).
        AsyncRuntime = crate::runtime::ChatRuntime,
);

/// A leader id: `(term, node_id)`, totally ordered (openraft's "advanced" leader id, the
/// macro's default). Committed leader ids are the same type.
pub type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>;
/// `(leader_id, index)` of a Raft log entry.
pub type LogId = openraft::LogId<LeaderId>;
/// A persisted vote.
pub type Vote = openraft::impls::Vote<LeaderId>;
/// A membership configuration (possibly joint).
pub type Membership = openraft::Membership<NodeId, Node>;
/// A membership with the log id of the entry that carried it.
pub type StoredMembership = openraft::StoredMembership<LeaderId, NodeId, Node>;
/// The payload of a Raft log entry.
pub type EntryPayload = openraft::EntryPayload<ChatBatch, NodeId, Node>;
/// A Raft log entry.
pub type Entry = openraft::Entry<LeaderId, EntryPayload>;
/// Snapshot metadata: last included log id and membership.
pub type SnapshotMeta = openraft::SnapshotMeta<LeaderId, NodeId, Node>;
/// A snapshot with its data.
pub type Snapshot<Data> = openraft::storage::Snapshot<LeaderId, NodeId, Node, Data>;

/// Builds a log id from its parts.
pub fn log_id(term: u64, node_id: NodeId, index: u64) -> LogId {
    LogId {
        leader_id: LeaderId { term, node_id },
        index,
    }
}

/// The application payload of one Raft entry: an encoded batch of chat commands.
///
/// The bytes are a `chat::Batch` (`chat/command.rs`). Kept as `Bytes` so an entry's
/// payload is the same buffer from proposal to disk to the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatBatch(pub Bytes);

impl fmt::Display for ChatBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChatBatch({} bytes)", self.0.len())
    }
}

/// The reply to one applied `ChatBatch`: where it lives and one outcome per command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatBatchReply {
    /// Raft log index of the entry that carried the batch.
    pub log_index: u64,
    /// What each command of the batch produced, in order (empty for blank and membership
    /// entries).
    pub outcomes: Vec<crate::chat::Outcome>,
}
