//! The gateway's connection layer: the server's side of the client protocol
//! (`wire/PROTOCOL.md`), independent of what answers the requests.
//!
//! This module owns accepting connections (at most [`GatewayLimits::connections_max`]),
//! the handshake, framing, request ids and in-flight accounting, the one writer task per
//! connection that coalesces frames, pushes and their bound, timeouts (handshake, idle,
//! stalled writes) and every close with its `Disconnect` reason. It answers `ping` itself
//! and hands every other request to a [`Service`], concurrently: one task per request,
//! or, for the short requests the service names ([`Service::runs_inline`], such as a
//! post), polled on the connection's own task.
//!
//! It must not know what a request means: validation of fields, sessions beyond the
//! handshake's token, permissions and storage belong to the [`Service`] (the Raft-backed
//! one lives elsewhere; the tests use a small in-memory one).
//!
//! Behaviour settled here, also stated in `PROTOCOL.md`:
//! - A request over the in-flight limit is answered at once with `RATE_LIMITED` and a
//!   `retry_after_ms` of [`IN_FLIGHT_RETRY_AFTER_MS`]; the connection stays up.
//! - A request stays in flight until its response has been *written* to the socket (or,
//!   for a subscription, until it ends), so requests in flight plus responses queued never
//!   exceed the limit.
//! - A push for a subscription whose `subscribe` response is not yet queued is held back
//!   and sent right after that response, so the response always comes first.
//! - When the server's own answers (ping, errors) cannot be queued, the gateway stops
//!   reading from that connection (backpressure) instead of buffering.

mod connection;
mod fdlimit;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatlog_wire::limits::FRAME_BYTES_MAX;
use chatlog_wire::proto::v1;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use connection::{ANSWER_BUFFER_BYTES, PushError, PushSender, SharedPush};
pub use connection::{PUSH_COUNTERS, PushCounters};
pub use fdlimit::raise_open_files_limit;

/// Default for [`GatewayLimits::connections_max`].
///
/// Why: each connection may hold a partial frame of up to `frame_bytes_max` (grown only
/// with bytes that arrived) plus its queues; 10,000 connections stay within a few GiB in
/// the worst case and far less in the typical one.
pub const CONNECTIONS_MAX: usize = 10_000;

/// Default for [`GatewayLimits::requests_in_flight_max`].
///
/// Why: the load shape the gateway is measured with is 64 in flight per connection;
/// twice that leaves room for subscriptions.
pub const REQUESTS_IN_FLIGHT_MAX: u32 = 128;

/// Default for [`GatewayLimits::push_queue_len_max`].
///
/// Why: ten history pages' worth of events may wait for one slow connection; a reader
/// further behind than that is disconnected and resyncs by seq.
pub const PUSH_QUEUE_LEN_MAX: usize = 1024;

/// Default for [`GatewayLimits::push_queue_bytes_max`].
///
/// Why: the pushes one connection has not taken yet are the server's memory, and a
/// count alone does not bound them (a push may be up to a frame, 1 MiB). A live push that
/// would take a connection's queue past this is refused and the connection is closed as
/// a slow reader (the queue always takes one push, however large); a subscription's
/// catch-up waits for room instead. Live pushes share their bytes between connections
/// (`SharedPush`), so many slow connections of one busy chat hold little more than one
/// copy; 4 MiB is ~4,000 typical messages, or 256 of the largest, of lag before a cut-off.
pub const PUSH_QUEUE_BYTES_MAX: usize = 4 << 20;

/// Default for [`GatewayLimits::handshake_timeout`]: a client that connects must
/// introduce itself promptly, or it only holds a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`GatewayLimits::idle_timeout`]: clients with nothing to say ping more
/// often than this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default for [`GatewayLimits::write_timeout`]: a peer whose socket accepts nothing for
/// this long is gone or not reading (a half-open connection).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// `retry_after_ms` of the `RATE_LIMITED` answer to a request over the in-flight limit:
/// roughly one storage group commit, after which a slot has likely freed.
pub const IN_FLIGHT_RETRY_AFTER_MS: u64 = 10;

/// `retry_after_ms` of the `Disconnect(UNAVAILABLE)` sent to a connection refused
/// because [`GatewayLimits::connections_max`] are open, or closed at shutdown.
pub const REFUSED_RETRY_AFTER_MS: u64 = 1_000;

/// Most refused connections being told why at once; beyond, a refused connection is
/// closed without a word. Why: telling costs a task and a socket for up to
/// [`LINGER_TIMEOUT`], and a flood of connections must not turn into a flood of those.
pub const REFUSALS_IN_PROGRESS_MAX: usize = 64;

/// How long a closing connection waits for the peer to close its side after the server
/// has sent its last frame, so that the peer reads that frame instead of a reset.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes read and discarded from a closing connection while lingering.
pub const LINGER_BYTES_MAX: usize = 64 * 1024;

/// Most bytes the writer task coalesces into one `write` (a typical socket buffer); one
/// frame may take a batch past it.
pub const WRITE_BATCH_BYTES_MAX: usize = 64 * 1024;

/// Most frames the writer task hands to one vectored `write` (`writev`). Why: queued
/// frames are written from their own buffers, never copied into a per-connection batch
/// (a live push's bytes are shared by every recipient), so a batch is a list of slices;
/// Linux takes up to 1,024 (`IOV_MAX`), and 64 pushes of a few hundred bytes are about
/// what a socket buffer takes at once. The slice list lives on the writer's stack.
pub const WRITE_BATCH_FRAMES_MAX: usize = 64;

const _: () = assert!(WRITE_BATCH_FRAMES_MAX <= 1024);

/// Most answers of the gateway's own (ping, errors for malformed requests, `RATE_LIMITED`)
/// queued per connection; past it the gateway stops reading that connection until the
/// writer catches up.
pub const IMMEDIATE_RESPONSES_MAX: usize = 64;

/// The server's name in `HandshakeOk`.
pub const SERVER_NAME: &str = concat!("chatlog/", env!("CARGO_PKG_VERSION"));

/// The protocol versions this gateway speaks, lowest first.
pub const PROTOCOL_VERSIONS: [u32; 1] = [chatlog_wire::limits::PROTOCOL_VERSION];

/// Limits of one gateway. Those a client needs go into `HandshakeOk.limits`.
#[derive(Debug, Clone)]
pub struct GatewayLimits {
    /// Most connections open at once; more are refused with `Disconnect(UNAVAILABLE)`.
    pub connections_max: usize,
    /// Most requests in flight per connection, subscriptions included.
    pub requests_in_flight_max: u32,
    /// Largest frame payload accepted or sent, in bytes.
    pub frame_bytes_max: u32,
    /// Most pushes queued per connection; a push beyond disconnects it as a slow reader.
    pub push_queue_len_max: usize,
    /// Most bytes of pushes queued per connection (one push is always taken); a live push
    /// beyond disconnects it as a slow reader, a subscription's catch-up waits for room.
    pub push_queue_bytes_max: usize,
    /// Time from accept to a complete handshake frame.
    pub handshake_timeout: Duration,
    /// A connection that sends no frame for this long is closed with
    /// `Disconnect(TIMEOUT)`.
    pub idle_timeout: Duration,
    /// Longest a write of queued frames may take before the connection is dropped.
    pub write_timeout: Duration,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            connections_max: CONNECTIONS_MAX,
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX,
            frame_bytes_max: FRAME_BYTES_MAX,
            push_queue_len_max: PUSH_QUEUE_LEN_MAX,
            push_queue_bytes_max: PUSH_QUEUE_BYTES_MAX,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

impl GatewayLimits {
    fn check(&self) {
        assert!(self.connections_max > 0, "connections_max must be positive");
        assert!(
            self.requests_in_flight_max > 0,
            "requests_in_flight_max must be positive"
        );
        assert!(
            self.frame_bytes_max > 0 && self.frame_bytes_max <= FRAME_BYTES_MAX,
            "frame_bytes_max must be within the protocol's limit"
        );
        assert!(
            self.push_queue_len_max > 0,
            "push_queue_len_max must be positive"
        );
        assert!(
            self.push_queue_bytes_max > 0,
            "push_queue_bytes_max must be positive"
        );
    }

    /// What `HandshakeOk.limits` tells clients.
    fn to_proto(&self) -> v1::Limits {
        v1::Limits {
            frame_bytes_max: self.frame_bytes_max,
            requests_in_flight_max: self.requests_in_flight_max,
            text_bytes_max: chatlog_wire::limits::TEXT_BYTES_MAX,
            page_items_max: chatlog_wire::limits::PAGE_ITEMS_MAX,
        }
    }
}

/// Who a connection is authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user_id: u64,
    /// The session (one device's login).
    pub session_id: u64,
    /// The session's device, where the node that authenticated the connection knows it
    /// (a login names it; a node holding the user's group reads it); empty otherwise.
    /// Shared: a principal is cloned for every request, and this never changes.
    pub device_id: Arc<str>,
}

/// What answers requests: implemented by the Raft-backed service (and by test fixtures).
///
/// The gateway calls [`Service::handle`] concurrently for the requests of one connection
/// and of many; each call runs in its own task (or on its connection's task, see
/// [`Service::runs_inline`]) and is cancelled when its connection closes. Pushes go through [`ConnCtx::pushes`].
pub trait Service: Send + Sync + 'static {
    /// Checks the handshake's session token (`None` for an anonymous connection) and
    /// returns who the connection is, or `None` to leave it anonymous. An error is sent
    /// as the handshake's answer (typically `UNAUTHENTICATED`) and the connection closed.
    fn authenticate(
        &self,
        token: Option<&str>,
    ) -> impl Future<Output = Result<Option<Principal>, v1::Error>> + Send;

    /// Answers one request; `request_id` is the client's id for it, which the pushes of
    /// a subscription carry. Never a `handshake` or `ping` (the gateway answers those),
    /// never an empty kind (`UNKNOWN_REQUEST`). The service checks everything else:
    /// fields, limits, whether the connection is authenticated ([`ConnCtx::principal`];
    /// a login sets it with [`ConnCtx::set_principal`]) and permissions.
    ///
    /// For a `subscribe` that succeeds, pushes with the request's id may be sent at any
    /// time, even before this returns: the gateway holds them until the response is
    /// queued. A `SubscriptionEnded` push ends the subscription's in-flight slot, as does
    /// a successful `unsubscribe`.
    fn handle(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: v1::request::Kind,
    ) -> impl Future<Output = Result<v1::response::Kind, v1::Error>> + Send;

    /// Answers a request for which [`Service::runs_inline`] said yes: the same as
    /// [`Service::handle`] (the default calls it), but a service may return a smaller
    /// future here, since the connection's task holds one per inline request in flight.
    fn handle_inline(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: v1::request::Kind,
    ) -> impl Future<Output = Result<v1::response::Kind, v1::Error>> + Send {
        self.handle(conn, request_id, request)
    }

    /// Whether `request` may be answered on its connection's own task instead of a task
    /// of its own: true only for requests whose handling is a short computation plus
    /// waiting (a proposal, a small in-memory read), never for one that may compute or
    /// block for long (a history page, a media transfer), since the connection reads
    /// nothing while its task computes. Inline requests still run concurrently with the
    /// connection's others, are bounded by the same in-flight limit and logged in the
    /// same span; what they save is a task spawn and a cross-task wake per request.
    /// The default keeps every request in a task of its own.
    fn runs_inline(&self, request: &v1::request::Kind) -> bool {
        let _ = request;
        false
    }

    /// The node id reported in `HandshakeOk`.
    fn node_id(&self) -> u64 {
        0
    }

    /// Called once when a connection has completed its handshake, before its first
    /// request is read; [`ConnCtx::principal`] is set when the handshake carried a valid
    /// session token. For example, to register an authenticated connection with a
    /// fan-out hub.
    fn connection_opened(&self, conn: &ConnCtx) {
        let _ = conn;
    }

    /// Called once when a connection that completed its handshake has closed, for
    /// example to drop its subscriptions from a fan-out hub. Its pushes fail from then on.
    fn connection_closed(&self, conn: &ConnCtx) {
        let _ = conn;
    }
}

/// One connection as a [`Service`] sees it.
#[derive(Debug)]
pub struct ConnCtx {
    id: u64,
    peer_addr: SocketAddr,
    principal: Mutex<Option<Principal>>,
    /// False when the client's handshake set `no_live_pushes`.
    live_pushes: bool,
    pushes: PushSender,
}

impl ConnCtx {
    /// A number naming this connection among those of this gateway, for logs.
    pub fn connection_id(&self) -> u64 {
        self.id
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Who the connection is authenticated as; `None` while anonymous.
    pub fn principal(&self) -> Option<Principal> {
        self.principal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Authenticates the connection (after a login) or makes it anonymous again (`None`).
    pub fn set_principal(&self, principal: Option<Principal>) {
        *self
            .principal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = principal;
    }

    /// Whether the client wants live pushes (its handshake did not set
    /// `no_live_pushes`): only such a connection is registered for live fan-out and
    /// counts its user online.
    pub fn live_pushes(&self) -> bool {
        self.live_pushes
    }

    /// Sends pushes to this connection; clone it to keep it (for example in a fan-out hub).
    pub fn pushes(&self) -> &PushSender {
        &self.pushes
    }

    /// A context for a request that reached this node without a connection of its own:
    /// one forwarded by another node for `principal` (`service::forward`). It has no
    /// pushes (each is refused as closed) and names no client address.
    pub fn detached(principal: Principal) -> ConnCtx {
        ConnCtx {
            id: 0,
            peer_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            principal: Mutex::new(Some(principal)),
            live_pushes: false,
            pushes: PushSender::closed(),
        }
    }

    /// Closes the connection: queued responses are written, then a `Disconnect` with
    /// `reason`. Requests still running are cancelled. For example, a revoked session.
    pub fn disconnect(&self, reason: v1::Error) {
        self.pushes.disconnect(reason);
    }
}

/// Serves client connections on `listener` until `shutdown` completes, then closes every
/// connection with `Disconnect(UNAVAILABLE)` and returns once they are all closed.
///
/// # Panics
///
/// If a limit is 0, or `frame_bytes_max` is over the protocol's
/// [`chatlog_wire::limits::FRAME_BYTES_MAX`].
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    limits: GatewayLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    limits.check();
    let limits = Arc::new(limits);
    let connection_slots = Arc::new(Semaphore::new(limits.connections_max));
    let refusal_slots = Arc::new(Semaphore::new(REFUSALS_IN_PROGRESS_MAX));
    let (shutdown_sender, shutdown_receiver) = watch::channel(false);
    let next_connection_id = AtomicU64::new(1);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically out of file descriptors: wait for connections to close
                // rather than spin.
                tracing::warn!(%error, "accepting a connection failed");
                if is_fatal_accept_error(&error) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&connection_slots).try_acquire_owned() else {
            tracing::debug!(%peer_addr, "refusing a connection: too many open");
            if let Ok(refusal) = Arc::clone(&refusal_slots).try_acquire_owned() {
                let write_timeout = limits.write_timeout;
                tokio::spawn(async move {
                    connection::refuse(stream, write_timeout).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let id = next_connection_id.fetch_add(1, Ordering::Relaxed);
        let service = Arc::clone(&service);
        let limits = Arc::clone(&limits);
        let shutdown = shutdown_receiver.clone();
        connections.spawn(async move {
            connection::run(id, stream, peer_addr, service, limits, shutdown).await;
            drop(slot);
        });
    }

    drop(listener);
    let _ = shutdown_sender.send(true);
    while connections.join_next().await.is_some() {}
}

/// Accept errors that mean the listener itself is broken.
fn is_fatal_accept_error(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::InvalidInput)
}

/// Sets `TCP_NODELAY`: responses are small and latency matters; the writer task already
/// coalesces what is queued.
fn configure(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "setting TCP_NODELAY failed");
    }
}
