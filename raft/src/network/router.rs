//! The client side of the node-to-node transport: [`Router`], openraft-multi's
//! `GroupRouter` for every group of this node, and [`NetworkFactory`], the per-group
//! `RaftNetworkFactory` that `Raft::new` takes.
//!
//! What it owns: the peer table (node id → address), one connection per peer (dialled
//! lazily, re-dialled with backoff after a failure), request ids and the table of
//! requests waiting for their response, each request's deadline, and the chunking of
//! snapshots. What it must not do: block one group behind another (each request waits
//! only for its own response), retry on its own (openraft retries and backs off), or
//! wait without a deadline.
//!
//! Errors, as openraft expects them: no address, a failed dial or handshake, a closed
//! connection and an error frame from the peer are `Unreachable` (openraft backs off
//! before the next try); a request that outlived its deadline (`RPCOption::soft_ttl`) is
//! `Timeout`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chatlog_wire::frame::{decode_message, read_frame, read_message, write_message};
use chatlog_wire::limits::{NODE_FRAME_BYTES_MAX, NODE_PROTOCOL_VERSION};
use chatlog_wire::proto::node::v1::{
    NodeErrorCode, NodeFrame, NodeHello, NodeHelloOk, node_frame::Payload,
};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::{self, ProposeResult};
use super::sink::FrameSink;
use super::{NodeIdentity, Rpc, encode_frame, node_frame};
use crate::chat::Command;
use crate::node::ProposeError;
use crate::snapshot_stream;
use crate::state_machine::SnapshotData;
use crate::types::{GroupId, Node, NodeId, Snapshot, TypeConfig, Vote};

/// Longest a dial plus handshake may take, whatever the deadline of the request that
/// triggered it: a dial runs in its own task, so a request with a short deadline (a
/// heartbeat) does not cut it short for the requests behind it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// This node's software release, sent in the handshake both ways (the workspace keeps
/// every crate at the release of the `chatlog` binary).
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Wait before the first re-dial after a failed one; doubles per failure.
pub const REDIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Longest wait between dials of an unreachable peer. Short enough that a restarted node
/// is back in its groups within about an election timeout; each dial is one SYN.
pub const REDIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Shares one connection per peer node among every group of this node. Clone it freely:
/// all clones share the same peers and connections.
#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    identity: NodeIdentity,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    /// Set by [`Router::shutdown`]: every later request fails at once.
    closed: AtomicBool,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("identity", &self.inner.identity)
            .field("peers", &lock(&self.inner.peers).len())
            .finish()
    }
}

/// Locks a mutex that is held only to read or swap a few fields; poisoning would mean a
/// panic there, a bug that already stopped us.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("network lock poisoned")
}

/// One peer node: its address and the state of our connection to it.
struct Peer {
    target: NodeId,
    state: Mutex<PeerState>,
}

struct PeerState {
    addr: SocketAddr,
    link: Link,
    /// Wait after the next failed dial.
    backoff: Duration,
    /// Bumped whenever `link` is replaced, so a dial that finishes after its address was
    /// changed does not install a connection to the old address.
    generation: u64,
    /// The software release the peer reported at the last successful handshake.
    version: Option<String>,
}

type DialResult = Result<Arc<Connection>, Arc<str>>;

enum Link {
    /// No connection. A dial may start at `retry_at` (at once when `None`).
    Down {
        retry_at: Option<Instant>,
        last_error: Arc<str>,
    },
    /// A dial task is running; every request waiting for the connection awaits it.
    Dialing(Shared<BoxFuture<'static, DialResult>>),
    /// Connected (it may have failed since: see [`Connection::is_closed`]).
    Up(Arc<Connection>),
}

/// Forwarded client requests (`client_request`) in flight on one connection at most;
/// beyond, a new one is not sent (`ForwardError::NotSent`: the caller tries another node
/// or answers "unavailable, retry"). Why: the peer serves at most
/// [`super::REQUESTS_IN_FLIGHT_MAX`] (4,096) requests per connection and refuses the
/// rest, and Raft's own messages share the connection; forwarded work comes from
/// clients, so it keeps to a quarter and leaves the rest to replication, votes and
/// fan-out polls.
pub const FORWARDED_IN_FLIGHT_MAX: usize = super::REQUESTS_IN_FLIGHT_MAX / 4;

/// Forwarded bot calls (`bot_request`) in flight on one connection at most, apart from
/// [`FORWARDED_IN_FLIGHT_MAX`]. Why: a bot call may be a long poll held 50 s; a pool of
/// its own keeps bots waiting for news from taking the slots short client requests
/// need, and the two together stay well under the peer's 4,096.
pub const BOT_CALLS_IN_FLIGHT_MAX: usize = super::REQUESTS_IN_FLIGHT_MAX / 8;

const _: () =
    assert!(FORWARDED_IN_FLIGHT_MAX + BOT_CALLS_IN_FLIGHT_MAX <= super::REQUESTS_IN_FLIGHT_MAX / 2);

/// One live connection: where requests are queued and where they wait for responses.
struct Connection {
    sink: FrameSink,
    waiting: Arc<Waiting>,
    /// Slots for forwarded client requests ([`FORWARDED_IN_FLIGHT_MAX`]).
    forwarded: Arc<tokio::sync::Semaphore>,
    /// Slots for forwarded bot calls ([`BOT_CALLS_IN_FLIGHT_MAX`]).
    bot_calls: Arc<tokio::sync::Semaphore>,
    next_request_id: AtomicU64,
    /// The peer's software release from its hello-ok (empty when it sent none).
    peer_version: String,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.sink.is_closed() || lock(&self.waiting.requests).is_none()
    }
}

/// Requests in flight on one connection, by request id; `None` once the connection
/// closed (every waiter is then woken with an error).
struct Waiting {
    requests: Mutex<Option<HashMap<u64, oneshot::Sender<Payload>>>>,
}

impl Waiting {
    fn close(&self) {
        lock(&self.requests).take();
    }
}

/// Removes its request from the table when dropped (response arrived, deadline passed or
/// the caller gave up), so the table holds only requests someone still waits for.
struct WaitGuard<'a> {
    waiting: &'a Waiting,
    request_id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Some(requests) = lock(&self.waiting.requests).as_mut() {
            requests.remove(&self.request_id);
        }
    }
}

/// Why a request failed, before it is named in openraft's terms.
enum CallError {
    /// The peer did not act on the request: no connection, a failed dial, a frame that
    /// never left this node, or an error frame (the peer refuses before serving).
    NotSent(String),
    /// The request may have been served: the connection failed after the frame was
    /// queued, or the peer answered with the wrong payload.
    Unreachable(String),
    Timeout(Duration),
}

/// Why a forwarded request ([`Router::propose`], [`Router::read_index`]) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The peer did not act on it (not connected, refused with an error frame); trying
    /// another node is safe.
    #[error("not delivered: {0}")]
    NotSent(String),
    /// It may or may not have been served (connection lost after sending, deadline
    /// passed, an undecodable answer).
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl From<CallError> for ForwardError {
    fn from(e: CallError) -> ForwardError {
        match e {
            CallError::NotSent(m) => ForwardError::NotSent(m),
            CallError::Unreachable(m) => ForwardError::Unknown(m),
            CallError::Timeout(t) => ForwardError::Unknown(format!("no answer within {t:?}")),
        }
    }
}

impl Router {
    /// A router for the node `identity` with no peers yet.
    pub fn new(identity: NodeIdentity) -> Router {
        Router {
            inner: Arc::new(RouterInner {
                identity,
                peers: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Who this router speaks for.
    pub fn identity(&self) -> NodeIdentity {
        self.inner.identity
    }

    /// The software release peer `node` reported at the last handshake with it, if
    /// this node ever connected to it.
    pub fn peer_version(&self, node: NodeId) -> Option<String> {
        let peer = lock(&self.inner.peers).get(&node).cloned()?;
        lock(&peer.state).version.clone()
    }

    /// Sets the address of node `node`. A changed address drops the current connection;
    /// the next request dials the new one.
    pub fn set_peer_addr(&self, node: NodeId, addr: SocketAddr) {
        let mut peers = lock(&self.inner.peers);
        match peers.get(&node) {
            Some(peer) => {
                let mut state = lock(&peer.state);
                if state.addr != addr {
                    state.addr = addr;
                    state.backoff = REDIAL_BACKOFF_MIN;
                    state.generation += 1;
                    state.link = Link::Down {
                        retry_at: None,
                        last_error: Arc::from("address changed"),
                    };
                }
            }
            None => {
                peers.insert(
                    node,
                    Arc::new(Peer {
                        target: node,
                        state: Mutex::new(PeerState {
                            addr,
                            link: Link::Down {
                                retry_at: None,
                                last_error: Arc::from("not dialled yet"),
                            },
                            backoff: REDIAL_BACKOFF_MIN,
                            generation: 0,
                            version: None,
                        }),
                    }),
                );
            }
        }
    }

    /// Forgets node `node` and closes the connection to it.
    pub fn remove_peer(&self, node: NodeId) {
        lock(&self.inner.peers).remove(&node);
    }

    /// Closes every connection; every later request fails as `Unreachable`. For a node
    /// that is stopping, after its groups were shut down.
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        lock(&self.inner.peers).clear();
    }

    /// The `RaftNetworkFactory` of group `group`, for `Raft::new`.
    pub fn network_factory(&self, group: GroupId) -> NetworkFactory {
        NetworkFactory {
            router: self.clone(),
            group,
        }
    }

    /// Frames and `write_all` calls made on the connection to `node`, if connected.
    /// Fewer writes than frames means frames were coalesced.
    pub fn connection_stats(&self, node: NodeId) -> Option<(u64, u64)> {
        let peer = lock(&self.inner.peers).get(&node).cloned()?;
        let state = lock(&peer.state);
        match &state.link {
            Link::Up(conn) => {
                let stats = conn.sink.stats();
                Some((
                    stats.frames.load(Ordering::Relaxed),
                    stats.writes.load(Ordering::Relaxed),
                ))
            }
            _ => None,
        }
    }

    /// Sends one request to `target` for `group` and returns the response body.
    async fn call(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: Rpc,
        body: Bytes,
        ttl: Duration,
    ) -> Result<Bytes, CallError> {
        let deadline = Instant::now() + ttl;
        let conn = self.connection(target, deadline).await?;
        let pool = match rpc {
            Rpc::Client => Some((&conn.forwarded, FORWARDED_IN_FLIGHT_MAX, "client requests")),
            Rpc::Bot => Some((&conn.bot_calls, BOT_CALLS_IN_FLIGHT_MAX, "bot calls")),
            _ => None,
        };
        let _slot = match pool {
            Some((slots, max, what)) => {
                Some(Arc::clone(slots).try_acquire_owned().map_err(|_| {
                    CallError::NotSent(format!(
                        "{max} forwarded {what} in flight to node {target} already"
                    ))
                })?)
            }
            None => None,
        };
        let request_id = conn.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&conn.waiting.requests).as_mut() {
            Some(requests) => {
                requests.insert(request_id, tx);
            }
            None => {
                return Err(CallError::NotSent(format!(
                    "the connection to node {target} closed"
                )));
            }
        }
        let _guard = WaitGuard {
            waiting: &conn.waiting,
            request_id,
        };
        let frame = node_frame(
            self.inner.identity,
            target,
            group,
            request_id,
            rpc.request(body),
        );
        let frame = encode_frame(&frame).map_err(|e| {
            CallError::NotSent(format!("encoding a {rpc:?} request for node {target}: {e}"))
        })?;
        match tokio::time::timeout_at(deadline, conn.sink.send(frame)).await {
            Err(_) => return Err(CallError::Timeout(ttl)),
            Ok(Err(closed)) => {
                return Err(CallError::NotSent(format!("node {target}: {closed}")));
            }
            Ok(Ok(())) => {}
        }
        let payload = match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => return Err(CallError::Timeout(ttl)),
            Ok(Err(_)) => {
                return Err(CallError::Unreachable(format!(
                    "the connection to node {target} closed before the {rpc:?} response"
                )));
            }
            Ok(Ok(payload)) => payload,
        };
        match rpc.response_body(payload) {
            Ok(body) => Ok(body),
            Err(Payload::Error(e)) => Err(CallError::NotSent(format!(
                "node {target} refused a {rpc:?} request for group {group}: {:?}: {}",
                NodeErrorCode::try_from(e.code).unwrap_or(NodeErrorCode::Unspecified),
                e.message
            ))),
            Err(other) => Err(CallError::Unreachable(format!(
                "node {target} answered a {rpc:?} request with {}",
                payload_name(&other)
            ))),
        }
    }

    /// The live connection to `target`, dialling if needed; waits for a dial at most
    /// until `deadline`.
    async fn connection(
        &self,
        target: NodeId,
        deadline: Instant,
    ) -> Result<Arc<Connection>, CallError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(CallError::NotSent("this node's router is shut down".into()));
        }
        let peer = lock(&self.inner.peers)
            .get(&target)
            .cloned()
            .ok_or_else(|| CallError::NotSent(format!("no address for node {target}")))?;
        let dial = {
            let mut state = lock(&peer.state);
            match &state.link {
                Link::Up(conn) if !conn.is_closed() => return Ok(Arc::clone(conn)),
                Link::Up(_) => {
                    // The connection failed since it was used; dial again at once.
                    self.start_dial(&peer, &mut state)
                }
                Link::Dialing(dial) => dial.clone(),
                Link::Down {
                    retry_at,
                    last_error,
                } => {
                    if let Some(at) = retry_at
                        && Instant::now() < *at
                    {
                        return Err(CallError::NotSent(format!(
                            "node {target} at {}: {last_error} (next dial in {:?})",
                            state.addr,
                            at.saturating_duration_since(Instant::now())
                        )));
                    }
                    self.start_dial(&peer, &mut state)
                }
            }
        };
        match tokio::time::timeout_at(deadline, dial).await {
            Err(_) => Err(CallError::NotSent(format!(
                "node {target}: still connecting"
            ))),
            Ok(Err(error)) => Err(CallError::NotSent(format!("node {target}: {error}"))),
            Ok(Ok(conn)) => Ok(conn),
        }
    }

    /// Spawns a dial of `peer` and records it as the peer's link.
    fn start_dial(
        &self,
        peer: &Arc<Peer>,
        state: &mut PeerState,
    ) -> Shared<BoxFuture<'static, DialResult>> {
        state.generation += 1;
        let generation = state.generation;
        let identity = self.inner.identity;
        let addr = state.addr;
        let peer_for_task = Arc::clone(peer);
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout(
                CONNECT_TIMEOUT,
                dial(identity, peer_for_task.target, addr),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(format!("no handshake within {CONNECT_TIMEOUT:?}")),
            };
            let result: DialResult = result
                .map(Arc::new)
                .map_err(|e| Arc::from(format!("dialling {addr}: {e}")));
            let mut state = lock(&peer_for_task.state);
            if state.generation == generation {
                match &result {
                    Ok(conn) => {
                        state.backoff = REDIAL_BACKOFF_MIN;
                        if !conn.peer_version.is_empty() {
                            state.version = Some(conn.peer_version.clone());
                        }
                        state.link = Link::Up(Arc::clone(conn));
                    }
                    Err(error) => {
                        tracing::debug!(node = peer_for_task.target, %error, "dial failed");
                        let backoff = state.backoff;
                        state.backoff = (backoff * 2).min(REDIAL_BACKOFF_MAX);
                        state.link = Link::Down {
                            retry_at: Some(Instant::now() + backoff),
                            last_error: Arc::clone(error),
                        };
                    }
                }
            }
            result
        });
        let dial = async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(Arc::from(format!("dial task failed: {e}"))),
            }
        }
        .boxed()
        .shared();
        state.link = Link::Dialing(dial.clone());
        dial
    }
}

/// Connects to `target` at `addr`, exchanges hello / hello-ok and starts the
/// connection's writer and reader tasks.
async fn dial(
    identity: NodeIdentity,
    target: NodeId,
    addr: SocketAddr,
) -> Result<Connection, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = stream.into_split();
    let hello = node_frame(
        identity,
        target,
        0,
        0,
        Payload::Hello(NodeHello {
            protocol_version: NODE_PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_string(),
            retain_entries: identity.retention.retain_entries,
            retain_bytes: identity.retention.retain_bytes,
        }),
    );
    write_message(&mut writer, &hello, NODE_FRAME_BYTES_MAX)
        .await
        .map_err(|e| e.to_string())?;
    let reply: NodeFrame = read_message(&mut reader, NODE_FRAME_BYTES_MAX)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("closed during the handshake")?;
    // A refusal first: it says why, whatever envelope it came in.
    if let Some(Payload::Error(e)) = &reply.payload {
        return Err(format!(
            "handshake refused: {:?}: {}",
            NodeErrorCode::try_from(e.code).unwrap_or(NodeErrorCode::Unspecified),
            e.message
        ));
    }
    if reply.cluster_id != identity.cluster_id {
        return Err(format!(
            "the peer is in cluster {}, not {}",
            reply.cluster_id, identity.cluster_id
        ));
    }
    if reply.from_node_id != target {
        return Err(format!(
            "the peer is node {}, not {target}",
            reply.from_node_id
        ));
    }
    let peer_version = match reply.payload {
        Some(Payload::HelloOk(NodeHelloOk {
            protocol_version,
            software_version,
        })) if protocol_version == NODE_PROTOCOL_VERSION => software_version,
        other => {
            return Err(format!(
                "unexpected handshake answer {}",
                other.as_ref().map_or("(empty)", payload_name)
            ));
        }
    };
    let waiting = Arc::new(Waiting {
        requests: Mutex::new(Some(HashMap::new())),
    });
    tokio::spawn(read_responses(
        reader,
        Arc::clone(&waiting),
        identity,
        target,
    ));
    Ok(Connection {
        sink: FrameSink::spawn(writer),
        waiting,
        forwarded: Arc::new(tokio::sync::Semaphore::new(FORWARDED_IN_FLIGHT_MAX)),
        bot_calls: Arc::new(tokio::sync::Semaphore::new(BOT_CALLS_IN_FLIGHT_MAX)),
        next_request_id: AtomicU64::new(1),
        peer_version,
    })
}

/// Completes waiting requests with the responses read from `reader`, until the stream
/// ends or breaks the protocol; then fails every request still waiting.
///
/// Holds only the waiting table, not the connection: when the router drops the
/// connection, its writer stops and shuts the socket's sending side, the peer closes its
/// side, and this task sees the end of the stream.
async fn read_responses(
    mut reader: OwnedReadHalf,
    waiting: Arc<Waiting>,
    identity: NodeIdentity,
    target: NodeId,
) {
    loop {
        let payload = match read_frame(&mut reader, NODE_FRAME_BYTES_MAX).await {
            Ok(Some(payload)) => payload,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(node = target, %error, "node connection: read failed");
                break;
            }
        };
        let frame: NodeFrame = match decode_message(payload) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::warn!(node = target, %error, "node connection: undecodable frame; closing");
                break;
            }
        };
        if frame.cluster_id != identity.cluster_id || frame.from_node_id != target {
            tracing::warn!(
                node = target,
                cluster_id = frame.cluster_id,
                from_node_id = frame.from_node_id,
                "node connection: frame from the wrong cluster or node; closing"
            );
            break;
        }
        let Some(payload) = frame.payload else {
            continue;
        };
        if frame.request_id == 0 {
            // Not an answer to a request of ours: the peer refusing the connection.
            tracing::warn!(
                node = target,
                reply = payload_name(&payload),
                "node connection: refused"
            );
            if let Payload::Error(_) = payload {
                break;
            }
            continue;
        }
        let tx = lock(&waiting.requests)
            .as_mut()
            .and_then(|requests| requests.remove(&frame.request_id));
        if let Some(tx) = tx {
            // The requester may have given up meanwhile; nothing to do then.
            let _ = tx.send(payload);
        }
    }
    waiting.close();
}

/// A payload's variant name, for errors and logs.
fn payload_name(payload: &Payload) -> &'static str {
    match payload {
        Payload::Hello(_) => "hello",
        Payload::HelloOk(_) => "hello_ok",
        Payload::VoteRequest(_) => "vote_request",
        Payload::VoteResponse(_) => "vote_response",
        Payload::AppendEntriesRequest(_) => "append_entries_request",
        Payload::AppendEntriesResponse(_) => "append_entries_response",
        Payload::InstallSnapshotRequest(_) => "install_snapshot_request",
        Payload::InstallSnapshotResponse(_) => "install_snapshot_response",
        Payload::SnapshotStreamRequest(_) => "snapshot_stream_request",
        Payload::SnapshotStreamResponse(_) => "snapshot_stream_response",
        Payload::PreVoteRequest(_) => "pre_vote_request",
        Payload::PreVoteResponse(_) => "pre_vote_response",
        Payload::TransferLeaderRequest(_) => "transfer_leader_request",
        Payload::TransferLeaderResponse(_) => "transfer_leader_response",
        Payload::ProposeRequest(_) => "propose_request",
        Payload::ProposeResponse(_) => "propose_response",
        Payload::ReadIndexRequest(_) => "read_index_request",
        Payload::ReadIndexResponse(_) => "read_index_response",
        Payload::MediaRequest(_) => "media_request",
        Payload::MediaResponse(_) => "media_response",
        Payload::FanoutRequest(_) => "fanout_request",
        Payload::FanoutResponse(_) => "fanout_response",
        Payload::ClientRequest(_) => "client_request",
        Payload::ClientResponse(_) => "client_response",
        Payload::TypingRequest(_) => "typing_request",
        Payload::TypingResponse(_) => "typing_response",
        Payload::BotRequest(_) => "bot_request",
        Payload::BotResponse(_) => "bot_response",
        Payload::OnlineRequest(_) => "online_request",
        Payload::OnlineResponse(_) => "online_response",
        Payload::RepairProbeRequest(_) => "repair_probe_request",
        Payload::RepairProbeResponse(_) => "repair_probe_response",
        Payload::Error(_) => "error",
    }
}

impl CallError {
    fn into_rpc(self, rpc: Rpc, from: NodeId, target: NodeId) -> RPCError<TypeConfig> {
        match self {
            CallError::NotSent(message) | CallError::Unreachable(message) => {
                RPCError::Unreachable(Unreachable::from_string(message))
            }
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action: rpc.action(),
                id: from,
                target,
                timeout,
            }),
        }
    }
}

fn undecodable(target: NodeId, e: codec::DecodeError) -> CallError {
    CallError::Unreachable(format!("node {target} sent an undecodable response: {e}"))
}

impl Router {
    /// One request / response exchange, in openraft's error terms.
    async fn rpc<T>(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: Rpc,
        body: Bytes,
        option: &RPCOption,
        decode: impl FnOnce(&Bytes) -> Result<T, codec::DecodeError>,
    ) -> Result<T, RPCError<TypeConfig>> {
        let result = match self.call(target, group, rpc, body, option.soft_ttl()).await {
            Ok(body) => decode(&body).map_err(|e| undecodable(target, e)),
            Err(e) => Err(e),
        };
        result.map_err(|e| e.into_rpc(rpc, self.inner.identity.node_id, target))
    }
}

/// Forwarded client work: what a node that does not lead a group asks of its leader.
impl Router {
    /// Sends `commands` for `group` to `target`, which proposes them through its own
    /// batcher, and returns the highest Raft index that carried one of them (0 if none)
    /// and one result per command. Waits at most `ttl`.
    pub async fn propose(
        &self,
        target: NodeId,
        group: GroupId,
        commands: &[Command],
        ttl: Duration,
    ) -> Result<(u64, Vec<ProposeResult>), ForwardError> {
        let body = codec::encode_propose_request(commands);
        let answer = self.call(target, group, Rpc::Propose, body, ttl).await?;
        let (index, results) = codec::decode_propose_response(group, &answer).map_err(|e| {
            ForwardError::Unknown(format!("node {target} answered a proposal with {e}"))
        })?;
        if results.len() != commands.len() {
            return Err(ForwardError::Unknown(format!(
                "node {target} answered {} results for {} commands",
                results.len(),
                commands.len()
            )));
        }
        Ok((index, results))
    }

    /// Asks `target` for a read index of `group`: the log index a replica must have
    /// applied before a read is linearizable. Waits at most `ttl`.
    pub async fn read_index(
        &self,
        target: NodeId,
        group: GroupId,
        ttl: Duration,
    ) -> Result<Result<u64, ProposeError>, ForwardError> {
        let body = codec::encode_read_index_request();
        let answer = self.call(target, group, Rpc::ReadIndex, body, ttl).await?;
        codec::decode_read_index_response(group, &answer).map_err(|e| {
            ForwardError::Unknown(format!("node {target} answered a read index with {e}"))
        })
    }
}

/// Issue 9 (session 7): a vote-unknown replica's probe (`crate::vote_probe`).
impl Router {
    /// Asks `target` for its vote and last log index in `group`. Waits at most `ttl`.
    pub async fn repair_probe(
        &self,
        target: NodeId,
        group: GroupId,
        ttl: Duration,
    ) -> Result<crate::vote_probe::ProbeAnswer, ForwardError> {
        let body = crate::vote_probe::encode_probe_request();
        let answer = self
            .call(target, group, Rpc::RepairProbe, body, ttl)
            .await?;
        crate::vote_probe::decode_probe_response(&answer).map_err(|e| {
            ForwardError::Unknown(format!("node {target} answered a repair probe with {e}"))
        })
    }
}

/// Media bytes between replicas (opaque here; `src/media/replicate.rs` encodes them).
impl Router {
    /// Sends an encoded media request for `group` to `target` and returns its encoded
    /// answer. Waits at most `ttl`.
    pub async fn media(
        &self,
        target: NodeId,
        group: GroupId,
        body: Bytes,
        ttl: Duration,
    ) -> Result<Bytes, ForwardError> {
        Ok(self.call(target, group, Rpc::Media, body, ttl).await?)
    }
}

/// Cross-node fan-out polls (opaque here; chatlog's `src/fanout/remote.rs` encodes them).
impl Router {
    /// Sends an encoded fan-out poll for `group` to `target` and returns its encoded
    /// answer. Waits at most `ttl` (the poll's own wait plus the way there and back).
    pub async fn fanout(
        &self,
        target: NodeId,
        group: GroupId,
        body: Bytes,
        ttl: Duration,
    ) -> Result<Bytes, ForwardError> {
        Ok(self.call(target, group, Rpc::Fanout, body, ttl).await?)
    }

    /// Sends an encoded forwarded client request for `group` to `target` and returns its
    /// encoded answer (opaque here; chatlog's service encodes both). Waits at most `ttl`.
    pub async fn client_request(
        &self,
        target: NodeId,
        group: GroupId,
        body: Bytes,
        ttl: Duration,
    ) -> Result<Bytes, ForwardError> {
        Ok(self.call(target, group, Rpc::Client, body, ttl).await?)
    }

    /// Sends an encoded forwarded bot call for `group` (the bot's) to `target` and
    /// returns its encoded answer (opaque here; chatlog's `src/bot/forward.rs` encodes
    /// both). Waits at most `ttl`, which must cover a long poll: the receiver gives up
    /// only after [`super::BOT_WORK_TIMEOUT`].
    pub async fn bot_request(
        &self,
        target: NodeId,
        group: GroupId,
        body: Bytes,
        ttl: Duration,
    ) -> Result<Bytes, ForwardError> {
        Ok(self.call(target, group, Rpc::Bot, body, ttl).await?)
    }

    /// Sends an encoded typing indicator to `target` (frame group 0). Waits at most `ttl`.
    pub async fn typing(
        &self,
        target: NodeId,
        body: Bytes,
        ttl: Duration,
    ) -> Result<(), ForwardError> {
        self.call(target, 0, Rpc::Typing, body, ttl).await?;
        Ok(())
    }

    /// Sends this node's encoded online users to `target` (frame group 0). Waits at most
    /// `ttl`.
    pub async fn online(
        &self,
        target: NodeId,
        body: Bytes,
        ttl: Duration,
    ) -> Result<(), ForwardError> {
        self.call(target, 0, Rpc::Online, body, ttl).await?;
        Ok(())
    }
}

impl GroupRouter<TypeConfig, GroupId> for Router {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: NodeId,
        group_id: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = codec::encode_append_entries_request(&rpc);
        self.rpc(target, group_id, Rpc::AppendEntries, body, &option, |b| {
            codec::decode_append_entries_response(b)
        })
        .await
    }

    async fn vote(
        &self,
        target: NodeId,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = codec::encode_vote_request(&rpc);
        self.rpc(target, group_id, Rpc::Vote, body, &option, |b| {
            codec::decode_vote_response(b)
        })
        .await
    }

    async fn pre_vote(
        &self,
        target: NodeId,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = codec::encode_vote_request(&rpc);
        self.rpc(target, group_id, Rpc::PreVote, body, &option, |b| {
            codec::decode_vote_response(b)
        })
        .await
    }

    /// Streams the snapshot (`crate::snapshot_stream::send`): chunks of at most
    /// `snapshot_stream::chunk_bytes()` (or openraft's `snapshot_chunk_size`, if
    /// smaller), the range read from the log as they go, up to `snapshot_stream::window_chunks` in flight, each within
    /// `soft_ttl` (the last within `snapshot_stream::INSTALL_WAIT`, since the peer answers
    /// it after installing); returns the peer's answer to the last chunk.
    async fn full_snapshot(
        &self,
        target: NodeId,
        group_id: GroupId,
        vote: Vote,
        snapshot: Snapshot<SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let chunk_bytes = option
            .snapshot_chunk_size()
            .map_or(snapshot_stream::chunk_bytes(), |n| {
                n.clamp(1, snapshot_stream::chunk_bytes())
            });
        let soft_ttl = option.soft_ttl();
        let me = self.inner.identity.node_id;
        let call = |body: Bytes, wait: Duration| async move {
            self.call(
                target,
                group_id,
                Rpc::SnapshotStream,
                body,
                wait.max(soft_ttl),
            )
            .await
            .map_err(|e| e.into_rpc(Rpc::SnapshotStream, me, target))
        };
        let sent = snapshot_stream::send(group_id, vote, snapshot, chunk_bytes, call);
        let mut cancel = std::pin::pin!(cancel);
        let result = tokio::select! {
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            result = sent => result,
        };
        match result {
            Ok(vote) => Ok(SnapshotResponse { vote }),
            Err(snapshot_stream::SendError::Rpc(e)) => Err(e.into()),
            Err(snapshot_stream::SendError::Source(m) | snapshot_stream::SendError::BadAck(m)) => {
                tracing::warn!(group = group_id, target, error = %m, "snapshot stream failed");
                Err(StreamingError::Unreachable(Unreachable::new(
                    &std::io::Error::other(m),
                )))
            }
        }
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        group_id: GroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let body = codec::encode_transfer_leader_request(&req);
        self.rpc(target, group_id, Rpc::TransferLeader, body, &option, |b| {
            codec::decode_transfer_leader_response(b)
        })
        .await
    }
}

/// The network of one group: what `Raft::new` takes. Every group's factory shares the
/// node's [`Router`], hence its connections.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    router: Router,
    group: GroupId,
}

impl NetworkFactory {
    /// The group this factory serves.
    pub fn group(&self) -> GroupId {
        self.group
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetworkAdapter<TypeConfig, GroupId, Router>;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> Self::Network {
        GroupNetworkAdapter::new(self.router.clone(), target, self.group)
    }
}
