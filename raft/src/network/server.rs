//! The server side of the node-to-node transport: [`serve`] accepts peers' connections
//! and hands each request to the `Raft` of its group.
//!
//! What it owns: per connection, the handshake state, the frame decoder, the requests
//! being served and the coalescing writer of responses; streamed snapshot chunks go to
//! the group's staging (`crate::snapshot_stream`), one spawned request each.
//! What it must not do: let one group's slow request hold back another's (each request
//! runs in its own task, at most [`REQUESTS_IN_FLIGHT_MAX`] per connection), trust the
//! peer (every frame is checked: cluster, receiver, group, payload), or grow without a
//! bound (see the constants). Bad input is answered with a `NodeError`; only a broken
//! stream (bad framing), a wrong cluster or receiver, or a failed handshake closes the
//! connection, and nothing a peer sends stops the node.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatlog_wire::FrameDecoder;
use chatlog_wire::frame::decode_message;
use chatlog_wire::limits::{NODE_FRAME_BYTES_MAX, NODE_PROTOCOL_VERSION};
use chatlog_wire::proto::node::v1::{NodeErrorCode, NodeFrame, NodeHelloOk, node_frame::Payload};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use futures_util::future::BoxFuture;

use super::codec::{self, ProposeResult};
use super::sink::FrameSink;
use super::{NodeIdentity, Rpc, encode_frame, node_error, node_frame};
use crate::ChatRaft;
use crate::chat::Command;
use crate::node::ProposeError;
use crate::types::{GroupId, NodeId};

/// Peer connections served at once. A cluster has a handful of nodes, each dialling us
/// once (plus a re-dial overlapping a dying connection); more means a misconfiguration
/// or an attack, and further connections are closed at once.
pub const CONNECTIONS_MAX: usize = 256;

/// Requests served at once on one connection; a request beyond it is answered with
/// `NODE_ERROR_CODE_UNAVAILABLE`. openraft keeps about one request in flight per group
/// and direction, so this allows a few thousand groups per node pair with room.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 4096;

/// Bytes read from the socket per `read` call.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Pause after a failed `accept` (out of file descriptors, …) before the next, so a
/// persistent failure does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Longest a forwarded proposal or read index is served before it is answered as
/// failed (unknown outcome, unavailable): a little over the forwarder's own deadline
/// (`node::FORWARD_TIMEOUT`), so a handler never outlives the wait it serves by much.
pub const FORWARDED_WORK_TIMEOUT: Duration = Duration::from_secs(12);

/// Longest a forwarded bot call (`bot_request`) is served before it is answered as
/// failed (unavailable). Why: a bot call may be a `getUpdates` long poll of up to 50 s;
/// the receiver answers it within its own call bound (chatlog's `bot::CALL_TIMEOUT`,
/// 60 s) and the forwarder waits a little longer (`bot::forward::FORWARD_TIMEOUT`,
/// 65 s, checked against this at compile time there), so this backstop only ends a
/// handler that outlived both and never makes the forwarder try another node while
/// the call may still be running.
pub const BOT_WORK_TIMEOUT: Duration = Duration::from_secs(70);

/// What the transport needs from the group manager: the `Raft` of a group this node holds.
pub trait GroupDirectory: Send + Sync + 'static {
    /// The local replica of `group`, or `None` if this node holds none.
    fn raft(&self, group: GroupId) -> Option<ChatRaft>;

    /// Proposes `commands` (forwarded by a peer) in `group`, whose replica is `raft`,
    /// and returns one result per command and the highest Raft index that carried one.
    /// The group manager sends them through the group's batcher; this default proposes
    /// them as one entry of their own.
    fn propose(
        &self,
        group: GroupId,
        raft: ChatRaft,
        commands: Vec<Command>,
    ) -> BoxFuture<'static, (Vec<ProposeResult>, u64)> {
        Box::pin(crate::node::propose_unbatched(group, raft, commands))
    }

    /// Serves an encoded media request (a part or a finish from another replica of
    /// `group`; opaque to this crate) and returns its encoded answer, or why it cannot
    /// be served. This default serves none.
    fn media(&self, group: GroupId, body: Bytes) -> BoxFuture<'static, Result<Bytes, String>> {
        let _ = body;
        Box::pin(async move { Err(format!("this node stores no media (group {group})")) })
    }

    /// Serves an encoded cross-node fan-out poll for `group` (opaque to this crate;
    /// chatlog's fan-out hub answers it) and returns its encoded answer, or why it cannot
    /// be served. This default serves none.
    fn fanout(&self, group: GroupId, body: Bytes) -> BoxFuture<'static, Result<Bytes, String>> {
        let _ = body;
        Box::pin(async move { Err(format!("this node serves no fan-out polls (group {group})")) })
    }

    /// Serves an encoded client request forwarded for `group` (opaque to this crate;
    /// chatlog's service answers it) and returns its encoded answer, or why it cannot be
    /// served. This default serves none.
    fn client_request(
        &self,
        group: GroupId,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, String>> {
        let _ = body;
        Box::pin(async move {
            Err(format!(
                "this node serves no client requests (group {group})"
            ))
        })
    }

    /// Serves an encoded HTTP bot call forwarded for `group`, the bot's (opaque to this
    /// crate; chatlog's bot API answers it), and returns its encoded answer, or why it
    /// cannot be served here (the forwarder then asks another node). This default
    /// serves none.
    fn bot_request(
        &self,
        group: GroupId,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, String>> {
        let _ = body;
        Box::pin(async move { Err(format!("this node serves no bot calls (group {group})")) })
    }

    /// Issue 9: why the local replica of `group` must not grant votes (or take a
    /// leadership handed to it) now — its log is damaged and repairing — or `None`.
    /// This default never refuses: a directory wrapping another must delegate it.
    fn vote_refusal(&self, group: GroupId) -> Option<String> {
        let _ = group;
        None
    }

    /// Issue 9 (session 7): why the local replica of `group` must not accept appends,
    /// snapshots or probes now — its vote is unknown (`crate::vote_probe`) — or `None`.
    /// This default never refuses: a directory wrapping another must delegate it.
    fn append_refusal(&self, group: GroupId) -> Option<String> {
        let _ = group;
        None
    }

    /// Takes another node's encoded online users (opaque to this crate; chatlog's
    /// fan-out hub keeps them). This default ignores them.
    fn online(&self, from: NodeId, body: Bytes) -> Result<(), String> {
        let _ = (from, body);
        Ok(())
    }

    /// Takes an encoded typing indicator for this node's sessions (opaque to this crate;
    /// chatlog's fan-out hub pushes it). This default ignores it.
    fn typing(&self, body: Bytes) -> Result<(), String> {
        let _ = body;
        Ok(())
    }
}

struct Context {
    identity: NodeIdentity,
    groups: Arc<dyn GroupDirectory>,
}

/// Serves peers' connections on `listener` until `shutdown` completes, then closes every
/// connection (requests being served are dropped) and returns.
pub async fn serve(
    listener: TcpListener,
    identity: NodeIdentity,
    groups: Arc<dyn GroupDirectory>,
    shutdown: impl Future<Output = ()>,
) {
    let context = Arc::new(Context { identity, groups });
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    if connections.len() >= CONNECTIONS_MAX {
                        tracing::warn!(%addr, "node server: too many connections; closing the new one");
                        continue;
                    }
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%addr, %error, "node server: set_nodelay failed");
                    }
                    connections.spawn(serve_connection(stream, Arc::clone(&context)));
                }
                Err(error) => {
                    tracing::warn!(%error, "node server: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    connections.shutdown().await;
}

/// What to do with the connection after a frame.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

/// One accepted connection.
struct Connection {
    context: Arc<Context>,
    sink: FrameSink,
    /// The peer, once its hello was accepted.
    peer: Option<NodeId>,
    handlers: JoinSet<()>,
}

async fn serve_connection(stream: TcpStream, context: Arc<Context>) {
    let (mut reader, writer) = stream.into_split();
    let mut conn = Connection {
        context,
        sink: FrameSink::spawn(writer),
        peer: None,
        handlers: JoinSet::new(),
    };
    let mut decoder = FrameDecoder::new(NODE_FRAME_BYTES_MAX);
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    'read: loop {
        tokio::select! {
            Some(joined) = conn.handlers.join_next(), if !conn.handlers.is_empty() => {
                if let Err(error) = joined {
                    tracing::error!(%error, "node server: a request handler failed");
                }
            }
            read = reader.read(&mut buf) => {
                let read = match read {
                    Ok(0) => break 'read,
                    Ok(read) => read,
                    Err(error) => {
                        tracing::debug!(%error, peer = ?conn.peer, "node server: read failed");
                        break 'read;
                    }
                };
                let mut input = &buf[..read];
                loop {
                    match decoder.decode(&mut input) {
                        Ok(Some(frame)) => {
                            if conn.on_frame(frame).await == Next::Close {
                                break 'read;
                            }
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::warn!(%error, peer = ?conn.peer, "node server: bad framing; closing");
                            let to = conn.peer.unwrap_or(0);
                            conn.reply(to, 0, 0, node_error(
                                NodeErrorCode::BadRequest,
                                format!("bad framing: {error}"),
                            )).await;
                            break 'read;
                        }
                    }
                }
            }
        }
    }
    // Dropping `conn` aborts its handlers and ends the writer once it wrote what is
    // queued (an error frame, say), which then closes the socket.
    if decoder.finish().is_err() {
        tracing::debug!(peer = ?conn.peer, "node server: connection ended inside a frame");
    }
}

impl Connection {
    /// Queues a frame to `to`; a closed writer means the connection is going away anyway.
    async fn reply(&self, to: NodeId, group: GroupId, request_id: u64, payload: Payload) {
        send(
            &self.sink,
            self.context.identity,
            to,
            group,
            request_id,
            payload,
        )
        .await;
    }

    async fn on_frame(&mut self, bytes: Bytes) -> Next {
        let frame: NodeFrame = match decode_message(bytes) {
            Ok(frame) => frame,
            Err(error) => {
                // The framing is intact, so the stream can go on.
                tracing::warn!(%error, peer = ?self.peer, "node server: undecodable frame");
                self.reply(
                    self.peer.unwrap_or(0),
                    0,
                    0,
                    node_error(
                        NodeErrorCode::BadRequest,
                        format!("undecodable frame: {error}"),
                    ),
                )
                .await;
                return Next::Continue;
            }
        };
        let identity = self.context.identity;
        let (from, group, request_id) = (frame.from_node_id, frame.group_id, frame.request_id);
        if frame.cluster_id != identity.cluster_id {
            tracing::warn!(
                cluster_id = frame.cluster_id,
                from,
                "node server: frame from another cluster; closing"
            );
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::WrongCluster,
                    format!(
                        "this node is in cluster {}, not {}",
                        identity.cluster_id, frame.cluster_id
                    ),
                ),
            )
            .await;
            return Next::Close;
        }
        if frame.to_node_id != identity.node_id {
            tracing::warn!(
                to_node_id = frame.to_node_id,
                from,
                "node server: frame for another node; closing"
            );
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::WrongNode,
                    format!(
                        "this is node {}, not {}",
                        identity.node_id, frame.to_node_id
                    ),
                ),
            )
            .await;
            return Next::Close;
        }
        let Some(payload) = frame.payload else {
            self.reply(
                from,
                group,
                request_id,
                node_error(NodeErrorCode::BadRequest, "a frame without a payload"),
            )
            .await;
            return Next::Continue;
        };
        if self.peer.is_none() {
            return self.on_hello(from, group, request_id, payload).await;
        }
        if let Payload::InstallSnapshotRequest(_) = payload {
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::BadRequest,
                    "install_snapshot_request is retired: snapshots travel as \
                     snapshot_stream_request",
                ),
            )
            .await;
            return Next::Continue;
        }
        let Some((rpc, body)) = Rpc::of_request(&payload) else {
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::BadRequest,
                    "only requests are accepted after the handshake",
                ),
            )
            .await;
            return Next::Continue;
        };
        let Some(raft) = self.context.groups.raft(group) else {
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::UnknownGroup,
                    format!(
                        "node {} holds no replica of group {group}",
                        identity.node_id
                    ),
                ),
            )
            .await;
            return Next::Continue;
        };
        while let Some(joined) = self.handlers.try_join_next() {
            if let Err(error) = joined {
                tracing::error!(%error, "node server: a request handler failed");
            }
        }
        if self.handlers.len() >= REQUESTS_IN_FLIGHT_MAX {
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::Unavailable,
                    format!("{REQUESTS_IN_FLIGHT_MAX} requests in flight on this connection"),
                ),
            )
            .await;
            return Next::Continue;
        }
        let work = Work::Request(rpc, body);
        let sink = self.sink.clone();
        let directory = Arc::clone(&self.context.groups);
        self.handlers.spawn(async move {
            let payload = match work.run(from, group, raft, directory).await {
                Ok(body) => rpc.response(body),
                Err(error) => error,
            };
            send(&sink, identity, from, group, request_id, payload).await;
        });
        Next::Continue
    }

    async fn on_hello(
        &mut self,
        from: NodeId,
        group: GroupId,
        request_id: u64,
        payload: Payload,
    ) -> Next {
        let Payload::Hello(hello) = payload else {
            self.reply(
                from,
                group,
                request_id,
                node_error(NodeErrorCode::BadRequest, "the first frame must be a hello"),
            )
            .await;
            return Next::Close;
        };
        if hello.protocol_version < NODE_PROTOCOL_VERSION {
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::UnsupportedVersion,
                    format!(
                        "this node speaks node protocol version {NODE_PROTOCOL_VERSION}, the peer at most {}",
                        hello.protocol_version
                    ),
                ),
            )
            .await;
            return Next::Close;
        }
        let ours = self.context.identity.retention;
        let theirs = crate::chat::retention::RetentionPolicy {
            retain_entries: hello.retain_entries,
            retain_bytes: hello.retain_bytes,
        };
        if theirs != ours {
            self.reply(
                from,
                group,
                request_id,
                node_error(
                    NodeErrorCode::BadRequest,
                    format!(
                        "retention differs: this node {}, node {from} {}; every node must \
                         run the same --retain-entries / --retain-bytes",
                        describe_retention(ours),
                        describe_retention(theirs)
                    ),
                ),
            )
            .await;
            return Next::Close;
        }
        self.peer = Some(from);
        self.reply(
            from,
            group,
            request_id,
            Payload::HelloOk(NodeHelloOk {
                protocol_version: NODE_PROTOCOL_VERSION,
                software_version: super::router::SOFTWARE_VERSION.to_string(),
            }),
        )
        .await;
        Next::Continue
    }
}

/// Queues one frame; failures mean the connection is closing, which its reader notices.
async fn send(
    sink: &FrameSink,
    identity: NodeIdentity,
    to: NodeId,
    group: GroupId,
    request_id: u64,
    payload: Payload,
) {
    let frame = node_frame(identity, to, group, request_id, payload);
    match encode_frame(&frame) {
        Ok(bytes) => {
            // A closed sink: the connection is going away and the peer's request with it.
            let _ = sink.send(bytes).await;
        }
        Err(error) => {
            tracing::error!(%error, to, group, "node server: a response does not fit in a frame");
        }
    }
}

/// One request to serve.
enum Work {
    Request(Rpc, Bytes),
}

impl Work {
    /// Decodes the request, hands it to `raft`, and encodes the answer (or the error
    /// payload to send instead).
    async fn run(
        self,
        from: NodeId,
        group: GroupId,
        raft: ChatRaft,
        directory: Arc<dyn GroupDirectory>,
    ) -> Result<Bytes, Payload> {
        let bad_request =
            |e: codec::DecodeError| node_error(NodeErrorCode::BadRequest, e.to_string());
        let unavailable =
            |e: &dyn std::fmt::Display| node_error(NodeErrorCode::Unavailable, e.to_string());
        // Issue 9: a damaged replica grants no votes until repaired (`crate::repair`).
        if let Work::Request(Rpc::Vote | Rpc::PreVote | Rpc::TransferLeader, _) = &self
            && let Some(refusal) = directory.vote_refusal(group)
        {
            crate::repair::note_vote_refused(group, from, &refusal);
            return Err(unavailable(&refusal));
        }
        // Issue 9 (session 7): a vote-unknown replica accepts no appends and answers no
        // probes until its own probe is done (`crate::vote_probe`).
        if let Work::Request(Rpc::AppendEntries | Rpc::SnapshotStream | Rpc::RepairProbe, _) = &self
            && let Some(refusal) = directory.append_refusal(group)
        {
            return Err(unavailable(&refusal));
        }
        match self {
            Work::Request(Rpc::AppendEntries, body) => {
                let req = codec::decode_append_entries_request(&body).map_err(bad_request)?;
                let resp = raft
                    .append_entries(req)
                    .await
                    .map_err(|e| unavailable(&e))?;
                Ok(codec::encode_append_entries_response(&resp))
            }
            Work::Request(Rpc::Vote, body) => {
                let req = codec::decode_vote_request(&body).map_err(bad_request)?;
                let resp = raft.vote(req).await.map_err(|e| unavailable(&e))?;
                Ok(codec::encode_vote_response(&resp))
            }
            Work::Request(Rpc::PreVote, body) => {
                let req = codec::decode_vote_request(&body).map_err(bad_request)?;
                let resp = raft.pre_vote(req).await.map_err(|e| unavailable(&e))?;
                Ok(codec::encode_vote_response(&resp))
            }
            Work::Request(Rpc::TransferLeader, body) => {
                let req = codec::decode_transfer_leader_request(&body).map_err(bad_request)?;
                let resp = raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(|e| unavailable(&e))?;
                Ok(codec::encode_transfer_leader_response(&resp))
            }
            Work::Request(Rpc::Propose, body) => {
                let commands = codec::decode_propose_request(&body).map_err(bad_request)?;
                let n = commands.len();
                let (results, index) = match tokio::time::timeout(
                    FORWARDED_WORK_TIMEOUT,
                    directory.propose(group, raft, commands),
                )
                .await
                {
                    Ok(results) => results,
                    Err(_) => {
                        let e = ProposeError::Unknown {
                            group,
                            detail: format!("not applied within {FORWARDED_WORK_TIMEOUT:?}"),
                        };
                        (vec![Err(e); n], 0)
                    }
                };
                Ok(codec::encode_propose_response(index, &results))
            }
            Work::Request(Rpc::ReadIndex, body) => {
                codec::decode_read_index_request(&body).map_err(bad_request)?;
                let result = tokio::time::timeout(
                    FORWARDED_WORK_TIMEOUT,
                    crate::node::read_index(group, &raft),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ProposeError::Unavailable {
                        group,
                        detail: format!(
                            "leadership not confirmed within {FORWARDED_WORK_TIMEOUT:?}"
                        ),
                    })
                });
                Ok(codec::encode_read_index_response(&result))
            }
            Work::Request(Rpc::Media, body) => {
                match tokio::time::timeout(FORWARDED_WORK_TIMEOUT, directory.media(group, body))
                    .await
                {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(node_error(NodeErrorCode::Unavailable, e)),
                    Err(_) => Err(node_error(
                        NodeErrorCode::Unavailable,
                        format!("media request not served within {FORWARDED_WORK_TIMEOUT:?}"),
                    )),
                }
            }
            Work::Request(Rpc::Fanout, body) => {
                match tokio::time::timeout(FORWARDED_WORK_TIMEOUT, directory.fanout(group, body))
                    .await
                {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(node_error(NodeErrorCode::Unavailable, e)),
                    Err(_) => Err(node_error(
                        NodeErrorCode::Unavailable,
                        format!("fan-out poll not served within {FORWARDED_WORK_TIMEOUT:?}"),
                    )),
                }
            }
            Work::Request(Rpc::Client, body) => {
                match tokio::time::timeout(
                    FORWARDED_WORK_TIMEOUT,
                    directory.client_request(group, body),
                )
                .await
                {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(node_error(NodeErrorCode::Unavailable, e)),
                    Err(_) => Err(node_error(
                        NodeErrorCode::Unavailable,
                        format!("client request not served within {FORWARDED_WORK_TIMEOUT:?}"),
                    )),
                }
            }
            Work::Request(Rpc::Bot, body) => {
                match tokio::time::timeout(BOT_WORK_TIMEOUT, directory.bot_request(group, body))
                    .await
                {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(node_error(NodeErrorCode::Unavailable, e)),
                    Err(_) => Err(node_error(
                        NodeErrorCode::Unavailable,
                        format!("bot call not served within {BOT_WORK_TIMEOUT:?}"),
                    )),
                }
            }
            Work::Request(Rpc::Typing, body) => directory
                .typing(body)
                .map(|()| Bytes::new())
                .map_err(|e| node_error(NodeErrorCode::BadRequest, e)),
            Work::Request(Rpc::Online, body) => directory
                .online(from, body)
                .map(|()| Bytes::new())
                .map_err(|e| node_error(NodeErrorCode::BadRequest, e)),
            Work::Request(Rpc::SnapshotStream, body) => serve_snapshot_chunk(raft, &body).await,
            Work::Request(Rpc::RepairProbe, body) => {
                crate::vote_probe::decode_probe_request(&body).map_err(bad_request)?;
                Ok(crate::vote_probe::encode_probe_response(
                    &crate::vote_probe::answer(&raft),
                ))
            }
        }
    }
}

/// Takes one chunk of a streamed snapshot into the group's staging
/// (`crate::snapshot_stream`); after the last, installs the snapshot and answers then.
async fn serve_snapshot_chunk(raft: ChatRaft, body: &Bytes) -> Result<Bytes, Payload> {
    use crate::snapshot_stream::{self, ChunkError, Received, StreamAck};
    let chunk = snapshot_stream::decode_chunk(body)
        .map_err(|e| node_error(NodeErrorCode::BadRequest, e.to_string()))?;
    let (transfer, seq) = (chunk.transfer, chunk.seq);
    let staging = raft
        .with_state_machine(|sm| {
            let staging = sm.staging();
            Box::pin(async move { staging })
        })
        .await
        .map_err(|e| node_error(NodeErrorCode::Unavailable, e.to_string()))?
        .ok_or_else(|| node_error(NodeErrorCode::Internal, "the group has no staging log"))?;
    let received = staging.receive(chunk).await.map_err(|e| match e {
        ChunkError::BadRequest(m) => node_error(NodeErrorCode::BadRequest, m),
        ChunkError::Unavailable(m) => node_error(NodeErrorCode::Unavailable, m),
    })?;
    match received {
        Received::Ack(ack) => Ok(snapshot_stream::encode_ack(&ack)),
        Received::Complete { vote, snapshot } => {
            // Detached: a connection that drops mid-install aborts its handlers, but the
            // install (and the end of the staging's "installing" state) must run to its end.
            let install = tokio::spawn(async move {
                let result = raft.install_full_snapshot(vote, snapshot).await;
                staging.done_installing(transfer).await;
                result
            });
            let response = install
                .await
                .map_err(|e| node_error(NodeErrorCode::Internal, e.to_string()))?
                .map_err(|e| node_error(NodeErrorCode::Unavailable, e.to_string()))?;
            Ok(snapshot_stream::encode_ack(&StreamAck {
                transfer,
                seq,
                vote: response.vote,
            }))
        }
    }
}

/// A retention policy as the handshake's refusal names it.
fn describe_retention(p: crate::chat::retention::RetentionPolicy) -> String {
    let part = |v: Option<u64>| v.map_or("none".to_string(), |n| n.to_string());
    format!(
        "retains entries={} bytes={}",
        part(p.retain_entries),
        part(p.retain_bytes)
    )
}
