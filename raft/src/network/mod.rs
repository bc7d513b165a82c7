//! The node-to-node transport: every Raft group of a node talks to a peer node over one
//! shared TCP connection.
//!
//! What it owns: the bytes of openraft's RPC messages ([`codec`]), the client side
//! ([`Router`], openraft-multi's `GroupRouter`: one lazily dialled connection per peer,
//! request ids, deadlines, sending streamed snapshots), the server side ([`serve`]:
//! handshake, cluster and node checks, dispatch to the group's `Raft` without
//! head-of-line blocking, streamed snapshot chunks handed to `crate::snapshot_stream`) and the coalescing writer both sides use ([`sink`]).
//! What it must not do: decide anything about Raft (openraft does), know where a group's
//! replicas live (the group manager tells the router peer addresses and implements
//! [`GroupDirectory`]), or trust a peer's bytes: every frame is checked before use, bad
//! input is answered with a `NodeError` and never stops the node.
//!
//! Frames are `chatlog.node.v1.NodeFrame` messages (`wire/proto/node.proto`, described in
//! `wire/PROTOCOL.md`) in chatlog-wire's length-prefixed framing with
//! [`NODE_FRAME_BYTES_MAX`]; the envelope carries cluster id, sender, receiver, group and
//! request id, the payload is one message encoded by [`codec`].
//!
//! Architecture invariant: one connection per (this node, peer node) pair carries every
//! group's requests from this node to that peer; responses come back on it. A peer's own
//! requests to us travel on the connection it dialled.

pub mod codec;
mod router;
mod server;
pub mod sink;

use bytes::{Bytes, BytesMut};
use chatlog_wire::limits::NODE_FRAME_BYTES_MAX;
use chatlog_wire::proto::node::v1::{NodeError, NodeErrorCode, NodeFrame, node_frame::Payload};
use openraft::network::RPCTypes;

pub use router::{
    BOT_CALLS_IN_FLIGHT_MAX, CONNECT_TIMEOUT, FORWARDED_IN_FLIGHT_MAX, ForwardError,
    NetworkFactory, REDIAL_BACKOFF_MAX, REDIAL_BACKOFF_MIN, Router,
};
pub use server::{
    BOT_WORK_TIMEOUT, CONNECTIONS_MAX, FORWARDED_WORK_TIMEOUT, GroupDirectory,
    REQUESTS_IN_FLIGHT_MAX, serve,
};

use crate::types::{GroupId, NodeId};

/// Largest snapshot chunk sent in one frame: 1 MiB (`snapshot_stream::STREAM_CHUNK_BYTES`).
///
/// Why: well under [`NODE_FRAME_BYTES_MAX`] (16 MiB), so a chunk never delays the
/// heartbeats queued behind it on the shared connection by more than ~1 ms at 10 Gbit/s,
/// while still amortising the round trip per chunk. openraft's
/// `snapshot_max_chunk_size` can only make chunks smaller.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;

// A chunk and its envelope (vote, meta, offsets: well under 64 KiB) fit in one frame.
const _: () = assert!(SNAPSHOT_CHUNK_BYTES_MAX + (64 << 10) <= NODE_FRAME_BYTES_MAX as usize);

/// Who this node is on the node-to-node protocol: both checked on every frame received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The cluster this node belongs to; frames from another cluster are refused.
    pub cluster_id: u64,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's log retention, sent in the hello: a peer with another policy is
    /// refused, since retention shapes the applied state every replica must share.
    pub retention: crate::chat::retention::RetentionPolicy,
}

impl NodeIdentity {
    /// A node of `cluster_id` keeping its whole log (no retention).
    pub fn new(cluster_id: u64, node_id: NodeId) -> NodeIdentity {
        NodeIdentity {
            cluster_id,
            node_id,
            retention: crate::chat::retention::RetentionPolicy::keep_all(),
        }
    }
}

/// The RPC kinds a frame can carry, and the payload variants of each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    AppendEntries,
    Vote,
    PreVote,
    /// A chunk of a streamed snapshot (`crate::snapshot_stream`).
    SnapshotStream,
    TransferLeader,
    /// Forwarded client commands (not an openraft RPC).
    Propose,
    /// A read index asked of the leader (not an openraft RPC).
    ReadIndex,
    /// Media bytes between replicas (not an openraft RPC; opaque to this crate).
    Media,
    /// A cross-node fan-out poll (not an openraft RPC; opaque to this crate).
    Fanout,
    /// A node's online users for the others (not an openraft RPC; opaque to this crate).
    Online,
    /// Issue 9 (session 7): a vote-unknown replica's probe (`crate::vote_probe`).
    RepairProbe,
    /// A client's request forwarded to a node with a replica of the group it reads (not
    /// an openraft RPC; opaque to this crate).
    Client,
    /// A typing indicator for another node's sessions (not an openraft RPC; opaque to
    /// this crate).
    Typing,
    /// An HTTP bot call forwarded to a node with a replica of the bot's group (not an
    /// openraft RPC; opaque to this crate).
    Bot,
}

impl Rpc {
    /// The request payload carrying `body`.
    fn request(self, body: Bytes) -> Payload {
        match self {
            Rpc::AppendEntries => Payload::AppendEntriesRequest(body),
            Rpc::Vote => Payload::VoteRequest(body),
            Rpc::PreVote => Payload::PreVoteRequest(body),
            Rpc::SnapshotStream => Payload::SnapshotStreamRequest(body),
            Rpc::TransferLeader => Payload::TransferLeaderRequest(body),
            Rpc::Propose => Payload::ProposeRequest(body),
            Rpc::ReadIndex => Payload::ReadIndexRequest(body),
            Rpc::Media => Payload::MediaRequest(body),
            Rpc::Fanout => Payload::FanoutRequest(body),
            Rpc::Online => Payload::OnlineRequest(body),
            Rpc::RepairProbe => Payload::RepairProbeRequest(body),
            Rpc::Client => Payload::ClientRequest(body),
            Rpc::Typing => Payload::TypingRequest(body),
            Rpc::Bot => Payload::BotRequest(body),
        }
    }

    /// The response payload carrying `body`.
    fn response(self, body: Bytes) -> Payload {
        match self {
            Rpc::AppendEntries => Payload::AppendEntriesResponse(body),
            Rpc::Vote => Payload::VoteResponse(body),
            Rpc::PreVote => Payload::PreVoteResponse(body),
            Rpc::SnapshotStream => Payload::SnapshotStreamResponse(body),
            Rpc::TransferLeader => Payload::TransferLeaderResponse(body),
            Rpc::Propose => Payload::ProposeResponse(body),
            Rpc::ReadIndex => Payload::ReadIndexResponse(body),
            Rpc::Media => Payload::MediaResponse(body),
            Rpc::Fanout => Payload::FanoutResponse(body),
            Rpc::Online => Payload::OnlineResponse(body),
            Rpc::RepairProbe => Payload::RepairProbeResponse(body),
            Rpc::Client => Payload::ClientResponse(body),
            Rpc::Typing => Payload::TypingResponse(body),
            Rpc::Bot => Payload::BotResponse(body),
        }
    }

    /// The body of `payload` if it is this RPC's response.
    fn response_body(self, payload: Payload) -> Result<Bytes, Payload> {
        match (self, payload) {
            (Rpc::AppendEntries, Payload::AppendEntriesResponse(b))
            | (Rpc::Vote, Payload::VoteResponse(b))
            | (Rpc::PreVote, Payload::PreVoteResponse(b))
            | (Rpc::SnapshotStream, Payload::SnapshotStreamResponse(b))
            | (Rpc::TransferLeader, Payload::TransferLeaderResponse(b))
            | (Rpc::Propose, Payload::ProposeResponse(b))
            | (Rpc::ReadIndex, Payload::ReadIndexResponse(b))
            | (Rpc::Media, Payload::MediaResponse(b))
            | (Rpc::Fanout, Payload::FanoutResponse(b))
            | (Rpc::Online, Payload::OnlineResponse(b))
            | (Rpc::RepairProbe, Payload::RepairProbeResponse(b))
            | (Rpc::Client, Payload::ClientResponse(b))
            | (Rpc::Typing, Payload::TypingResponse(b))
            | (Rpc::Bot, Payload::BotResponse(b)) => Ok(b),
            (_, other) => Err(other),
        }
    }

    /// The RPC kind and body of a request payload; `None` for anything else.
    fn of_request(payload: &Payload) -> Option<(Rpc, Bytes)> {
        match payload {
            Payload::AppendEntriesRequest(b) => Some((Rpc::AppendEntries, b.clone())),
            Payload::VoteRequest(b) => Some((Rpc::Vote, b.clone())),
            Payload::PreVoteRequest(b) => Some((Rpc::PreVote, b.clone())),
            Payload::SnapshotStreamRequest(b) => Some((Rpc::SnapshotStream, b.clone())),
            Payload::TransferLeaderRequest(b) => Some((Rpc::TransferLeader, b.clone())),
            Payload::ProposeRequest(b) => Some((Rpc::Propose, b.clone())),
            Payload::ReadIndexRequest(b) => Some((Rpc::ReadIndex, b.clone())),
            Payload::MediaRequest(b) => Some((Rpc::Media, b.clone())),
            Payload::FanoutRequest(b) => Some((Rpc::Fanout, b.clone())),
            Payload::OnlineRequest(b) => Some((Rpc::Online, b.clone())),
            Payload::RepairProbeRequest(b) => Some((Rpc::RepairProbe, b.clone())),
            Payload::ClientRequest(b) => Some((Rpc::Client, b.clone())),
            Payload::TypingRequest(b) => Some((Rpc::Typing, b.clone())),
            Payload::BotRequest(b) => Some((Rpc::Bot, b.clone())),
            _ => None,
        }
    }

    /// openraft's name for the RPC, for `Timeout` errors. Forwarded client work never
    /// reaches openraft; it is named as the append it turns into.
    fn action(self) -> RPCTypes {
        match self {
            Rpc::AppendEntries
            | Rpc::Propose
            | Rpc::ReadIndex
            | Rpc::Media
            | Rpc::Fanout
            | Rpc::Online
            | Rpc::RepairProbe
            | Rpc::Client
            | Rpc::Typing
            | Rpc::Bot => RPCTypes::AppendEntries,
            Rpc::Vote | Rpc::PreVote => RPCTypes::Vote,
            Rpc::SnapshotStream => RPCTypes::InstallSnapshot,
            Rpc::TransferLeader => RPCTypes::TransferLeader,
        }
    }
}

/// A `NodeFrame` from `identity` to `to`.
fn node_frame(
    identity: NodeIdentity,
    to: NodeId,
    group_id: GroupId,
    request_id: u64,
    payload: Payload,
) -> NodeFrame {
    NodeFrame {
        cluster_id: identity.cluster_id,
        from_node_id: identity.node_id,
        to_node_id: to,
        group_id,
        request_id,
        payload: Some(payload),
    }
}

/// An error payload.
fn node_error(code: NodeErrorCode, message: impl Into<String>) -> Payload {
    Payload::Error(NodeError {
        code: code.into(),
        message: message.into(),
    })
}

/// `frame` with its length prefix, ready for a [`sink::FrameSink`].
fn encode_frame(frame: &NodeFrame) -> Result<Bytes, chatlog_wire::Error> {
    let mut out = BytesMut::new();
    chatlog_wire::frame::encode_message(frame, NODE_FRAME_BYTES_MAX, &mut out)?;
    Ok(out.freeze())
}
