//! The async client library: one TCP connection to a chatlog server, pipelined and
//! multiplexed, reconnecting, with retries of idempotent requests.
//!
//! This module owns the client's side of a connection's life cycle (`PROTOCOL.md`,
//! "Connection life cycle"): the handshake, request ids, pairing responses with their
//! requests, routing pushes, and redialling after a drop. It does not interpret requests
//! beyond what retrying needs (which requests are safe to repeat) and never decides
//! anything for the application: errors come back typed, as [`ClientError`].
//!
//! Shape: callers encode their request and hand the bytes to one writer task, which
//! coalesces whatever is queued into one `write`; one reader task decodes frames and
//! completes each caller's oneshot by request id, or queues a push. Everything queued is
//! bounded: requests in flight by a semaphore (the smaller of
//! [`ClientOptions::requests_in_flight_max`] and the server's limit), the write queue by
//! the same number, pushes by [`ClientOptions::push_queue_len_max`] (overflow drops pushes
//! and reports [`PushItem::Lagged`] instead of growing).
//!
//! ```no_run
//! # async fn demo() -> Result<(), chatlog_wire::client::ClientError> {
//! use chatlog_wire::client::{Client, ClientOptions};
//! use chatlog_wire::proto::v1;
//!
//! let client = Client::connect("127.0.0.1:7000", ClientOptions::default()).await?;
//! let sent = client
//!     .send_message(v1::SendMessageRequest {
//!         chat_id: 7,
//!         client_message_id: 0x5eed,
//!         text: "hello".into(),
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("seq {}", sent.seq);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::frame::{FrameReader, decode_message, encode_message};
use crate::limits::{FRAME_BYTES_MAX, PROTOCOL_VERSION};
use crate::proto::v1::{self, push, request, response};

/// Default for [`ClientOptions::requests_in_flight_max`].
///
/// Why: 4 connections × 64 in flight is the load shape the gateway is measured with; 256
/// lets one connection carry that whole load, and the server's own limit (from the
/// handshake) lowers it when smaller.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Default for [`ClientOptions::push_queue_len_max`].
///
/// Why: a history page is 100 events; ten pages' worth of pushes may wait for a slow
/// consumer before it is told it lagged and must resync by seq.
pub const PUSH_QUEUE_LEN_MAX: usize = 1024;

/// Most bytes the writer task coalesces into one `write`.
///
/// Why: 64 KiB is a typical socket send buffer; a batch that size goes out in one
/// system call without holding a frame back for long. A single larger frame is written
/// on its own.
pub const WRITE_BATCH_BYTES_MAX: usize = 64 * 1024;

/// Default for [`ClientOptions::retries_max`].
pub const RETRIES_MAX: u32 = 5;

/// Default for [`ReconnectPolicy::attempts_max`].
pub const RECONNECT_ATTEMPTS_MAX: u32 = 5;

/// Default for [`ClientOptions::connect_timeout`]: TCP connect plus handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default for [`ClientOptions::request_timeout`].
///
/// Why: the send budget is 100 ms; ten times that, the server is in trouble and the
/// caller should hear about it rather than wait.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Request id of the handshake, the first request on every connection.
const HANDSHAKE_REQUEST_ID: u64 = 1;

/// How often a connection's reader checks its pending requests' deadlines, as a
/// fraction of [`ClientOptions::request_timeout`]: a request times out between its
/// timeout and 1/16 of it later.
///
/// Why a sweep and not a timer per call: a `tokio::time::timeout` per request entered and
/// left the runtime's timer wheel (a lock each) for every call, at load ~100,000 a second
/// and most of them answered within a millisecond; one sleep per connection, re-armed once
/// per period, costs the same whatever the rate. 1/16: late by at most ~6%.
pub const TIMEOUT_SWEEP_FRACTION: u32 = 16;

/// Bounds of the sweep period ([`TIMEOUT_SWEEP_FRACTION`]): at least 5 ms (a very short
/// timeout must not turn the reader into a busy loop), at most 1 s (a long timeout is
/// still enforced within a second of its deadline).
pub const TIMEOUT_SWEEP_MIN: Duration = Duration::from_millis(5);
/// See [`TIMEOUT_SWEEP_MIN`].
pub const TIMEOUT_SWEEP_MAX: Duration = Duration::from_secs(1);

/// The sweep period for a connection whose requests time out after `request_timeout`.
fn sweep_period(request_timeout: Duration) -> Duration {
    (request_timeout / TIMEOUT_SWEEP_FRACTION).clamp(TIMEOUT_SWEEP_MIN, TIMEOUT_SWEEP_MAX)
}

/// How a [`Client`] redials after its connection dropped.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// Dial attempts per redial (each with its own handshake) before a call fails; 0
    /// never redials, so every call after a drop fails with [`ClientError::Disconnected`].
    pub attempts_max: u32,
    /// Wait before the second attempt; doubles for each later one.
    pub backoff_initial: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
}

impl ReconnectPolicy {
    /// A policy that never redials.
    pub fn never() -> Self {
        ReconnectPolicy {
            attempts_max: 0,
            ..ReconnectPolicy::default()
        }
    }

    /// The wait before attempt `attempt` (0-based; attempt 0 does not wait).
    fn backoff(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (attempt - 1).min(16);
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            attempts_max: RECONNECT_ATTEMPTS_MAX,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent in the handshake, for the server's logs; at most
    /// [`crate::limits::CLIENT_NAME_BYTES_MAX`] bytes.
    pub client_name: String,
    /// A session token to authenticate each connection in its handshake. A successful
    /// [`Client::login`] replaces it, so a reconnect stays logged in.
    pub token: Option<String>,
    /// Limit on dialling plus the handshake, per attempt.
    pub connect_timeout: Duration,
    /// Limit on one attempt of one request, from asking for an in-flight slot to the
    /// response. Its outcome is then unknown ([`ClientError::Timeout`]).
    pub request_timeout: Duration,
    /// How to redial after a drop.
    pub reconnect: ReconnectPolicy,
    /// Most requests in flight at once (subscriptions included); lowered to the
    /// server's `requests_in_flight_max` when that is smaller. Further calls wait.
    pub requests_in_flight_max: usize,
    /// Most pushes waiting for [`PushReceiver::recv`]; beyond, pushes are dropped and
    /// counted in a [`PushItem::Lagged`].
    pub push_queue_len_max: usize,
    /// Most repeats of one call: of any request refused with `RATE_LIMITED` (nothing was
    /// done), and of requests safe to repeat (see [`Client::call`]) after a drop, a
    /// `TIMEOUT` or an `UNAVAILABLE`.
    pub retries_max: u32,
    /// Whether the server pushes this client live events (the chats' new events, the
    /// user's own updates, typing, secret messages) and counts its user online. True for
    /// a client that shows a user's chats; false for one that only sends and asks (a bot
    /// posting, the CLI's `send`, a load generator): the server then spends nothing on
    /// pushes it would drop. Answers, subscriptions and `get_presence` work either way.
    pub live_pushes: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_name: concat!("chatlog-wire/", env!("CARGO_PKG_VERSION")).to_owned(),
            token: None,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            reconnect: ReconnectPolicy::default(),
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX,
            push_queue_len_max: PUSH_QUEUE_LEN_MAX,
            retries_max: RETRIES_MAX,
            live_pushes: true,
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an `Error` (or refused the handshake, or sent a
    /// `Disconnect` instead of answering it).
    #[error("server error {code:?}: {message}")]
    Server {
        /// What kind of failure; an unknown number reads as `Internal`.
        code: v1::ErrorCode,
        /// For people; never branch on it.
        message: String,
        /// Wait this long before retrying, when the server said so.
        retry_after: Option<Duration>,
    },
    /// No response within [`ClientOptions::request_timeout`] (or
    /// [`ClientOptions::connect_timeout`] while connecting); the outcome is unknown.
    #[error("timed out; the outcome is unknown")]
    Timeout,
    /// The connection dropped before the response arrived (the outcome is unknown), and
    /// the request was not repeated or the redial failed.
    #[error("disconnected from the server; the outcome is unknown")]
    Disconnected,
    /// The server broke the protocol: an unexpected response kind, a bad frame.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The request could not be encoded into one frame (over the server's
    /// `frame_bytes_max`); nothing was sent.
    #[error("request not sent: {0}")]
    Encode(#[source] crate::Error),
    /// Dialling failed.
    #[error("cannot connect: {0}")]
    Io(#[source] io::Error),
    /// Reading or writing a local file of a media transfer failed (`client/media.rs`).
    #[error("{action} {path}: {source}")]
    LocalFile {
        /// What was being done: "reading", "writing", "opening".
        action: &'static str,
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<v1::ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The error the server sent.
    pub fn from_proto(error: v1::Error) -> Self {
        let code = v1::ErrorCode::try_from(error.code).unwrap_or(v1::ErrorCode::Internal);
        let code = if code == v1::ErrorCode::Unspecified {
            v1::ErrorCode::Internal
        } else {
            code
        };
        ClientError::Server {
            code,
            message: error.message,
            retry_after: (error.retry_after_ms > 0)
                .then(|| Duration::from_millis(error.retry_after_ms)),
        }
    }
}

/// What [`PushReceiver::recv`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum PushItem {
    /// A push from the server.
    Push {
        /// The subscribe request's id for subscription pushes, 0 for the others.
        request_id: u64,
        /// The push.
        push: push::Kind,
    },
    /// This many pushes were dropped here because the queue was full; the pushes before
    /// this item came before the gap, the ones after it after the gap. Resync by seq.
    Lagged {
        /// Pushes dropped.
        dropped: u64,
    },
    /// The connection dropped: its subscriptions are over. Subscribe again (from the
    /// next seq wanted) once a call has reconnected.
    ConnectionLost,
}

/// Receives the pushes of a [`Client`]'s connections, in the order they arrived.
#[derive(Debug)]
pub struct PushReceiver {
    receiver: mpsc::Receiver<PushItem>,
    shared: Arc<PushShared>,
}

impl PushReceiver {
    /// The next push; `None` once the client is dropped and every push was received.
    pub async fn recv(&mut self) -> Option<PushItem> {
        match self.receiver.try_recv() {
            Ok(item) => return Some(item),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        // Drained: report the gap before anything that arrives after it.
        let dropped = self.shared.dropped.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            return Some(PushItem::Lagged { dropped });
        }
        self.receiver.recv().await
    }
}

/// The sending side of the push queue, shared by every connection of a client.
#[derive(Debug)]
struct PushShared {
    sender: mpsc::Sender<PushItem>,
    /// Pushes dropped since the receiver last drained the queue. While non-zero,
    /// everything is dropped, so that the receiver sees the gap in its place.
    dropped: AtomicU64,
}

impl PushShared {
    /// True while pushes are being dropped (the receiver has not drained the queue since
    /// it overflowed): a push arriving now would be dropped whatever it holds.
    fn dropping(&self) -> bool {
        self.dropped.load(Ordering::Acquire) > 0
    }

    /// Counts a push dropped without being decoded (see [`is_live_push`]).
    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::AcqRel);
    }

    fn deliver(&self, item: PushItem) {
        if self.dropped.load(Ordering::Acquire) > 0 {
            self.dropped.fetch_add(1, Ordering::AcqRel);
            return;
        }
        match self.sender.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::AcqRel);
            }
            // The receiver was dropped: nobody wants pushes.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// A connection to a chatlog server; cheap to clone (clones share the connection).
///
/// Calls may run concurrently from many tasks: they are pipelined on one connection and
/// answered in any order. Dropping the last clone closes the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: String,
    options: ClientOptions,
    /// The token the next handshake sends; a login replaces it.
    token: Mutex<Option<String>>,
    /// The live connection, or the dead one until a call redials.
    current: Mutex<Option<Arc<Connection>>>,
    /// Held while redialling, so that concurrent calls redial once.
    dial_lock: tokio::sync::Mutex<()>,
    pushes: Arc<PushShared>,
    /// Until [`Client::pushes`] takes it.
    push_receiver: Mutex<Option<PushReceiver>>,
}

impl Client {
    /// Connects to `addr` (`host:port`) and does the handshake: one attempt within
    /// [`ClientOptions::connect_timeout`]. Later drops are redialled by the calls that
    /// find them, as [`ClientOptions::reconnect`] says.
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let (sender, receiver) = mpsc::channel(options.push_queue_len_max.max(1));
        let pushes = Arc::new(PushShared {
            sender,
            dropped: AtomicU64::new(0),
        });
        let client = Client {
            inner: Arc::new(Inner {
                addr: addr.to_owned(),
                token: Mutex::new(options.token.clone()),
                options,
                current: Mutex::new(None),
                dial_lock: tokio::sync::Mutex::new(()),
                push_receiver: Mutex::new(Some(PushReceiver {
                    receiver,
                    shared: Arc::clone(&pushes),
                })),
                pushes,
            }),
        };
        let connection = client.dial().await?;
        *lock(&client.inner.current) = Some(connection);
        Ok(client)
    }

    /// The receiver of this client's pushes; `Some` only the first time. Until it is
    /// taken (and while it is not read), pushes beyond
    /// [`ClientOptions::push_queue_len_max`] are dropped and counted.
    pub fn pushes(&self) -> Option<PushReceiver> {
        lock(&self.inner.push_receiver).take()
    }

    /// The `HandshakeOk` of the current connection: server name, node, authenticated
    /// user and session, limits. `None` when the connection has dropped.
    pub fn server_info(&self) -> Option<v1::HandshakeOk> {
        let current = lock(&self.inner.current);
        current
            .as_ref()
            .filter(|connection| !connection.shared.is_closed())
            .map(|connection| connection.handshake.clone())
    }

    /// Sends one request and waits for its response.
    ///
    /// An `Error` response becomes [`ClientError::Server`]. A request refused with
    /// `RATE_LIMITED` is repeated after its `retry_after` (nothing was done). Requests
    /// that are safe to repeat (`PROTOCOL.md`, "Retries and idempotency") are also
    /// repeated, on a redialled connection if need be, after a drop, `TIMEOUT` or
    /// `UNAVAILABLE`: `send_message` with a non-zero `client_message_id` (with the same
    /// id, so the server returns the original seq), reads, `mark_read` and `ping`.
    /// Every other request in flight at a drop fails with [`ClientError::Disconnected`].
    /// At most [`ClientOptions::retries_max`] repeats. A `handshake` is refused: the
    /// client does that itself.
    pub async fn call(&self, kind: request::Kind) -> Result<response::Kind, ClientError> {
        if matches!(kind, request::Kind::Handshake(_)) {
            return Err(ClientError::Protocol(
                "the client sends the handshake itself".into(),
            ));
        }
        let repeatable = is_repeatable(&kind);
        let mut attempt = 0;
        loop {
            let result = self.call_once(&kind).await;
            let retry_after = match &result {
                Err(ClientError::Server {
                    code: v1::ErrorCode::RateLimited,
                    retry_after,
                    ..
                }) => Some(*retry_after),
                Err(ClientError::Server {
                    code: v1::ErrorCode::Timeout | v1::ErrorCode::Unavailable,
                    retry_after,
                    ..
                }) if repeatable => Some(*retry_after),
                Err(ClientError::Disconnected) if repeatable => Some(None),
                _ => None,
            };
            match retry_after {
                Some(wait) if attempt < self.inner.options.retries_max => {
                    attempt += 1;
                    let wait =
                        wait.unwrap_or_else(|| self.inner.options.reconnect.backoff(attempt));
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    if let Ok(response::Kind::Login(login)) = &result {
                        *lock(&self.inner.token) = Some(login.session_token.clone());
                    }
                    return result;
                }
            }
        }
    }

    /// One attempt: on the live connection, or a redialled one.
    async fn call_once(&self, kind: &request::Kind) -> Result<response::Kind, ClientError> {
        let connection = self.connection().await?;
        connection
            .request(kind, self.inner.options.request_timeout)
            .await
    }

    /// The live connection, redialling when the last one dropped.
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        // Boxed: dialling's future (connect, handshake, backoff) is several times the
        // size of a request's, and every call's future would otherwise carry it (and be
        // copied with it) although calls almost never dial.
        Box::pin(self.redial()).await
    }

    /// Dials a new connection (unless another call did meanwhile), with the reconnect
    /// policy's attempts and backoff.
    async fn redial(&self) -> Result<Arc<Connection>, ClientError> {
        let _dialling = self.inner.dial_lock.lock().await;
        // Another call may have redialled while this one waited.
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        let policy = &self.inner.options.reconnect;
        let mut last_error = ClientError::Disconnected;
        for attempt in 0..policy.attempts_max {
            tokio::time::sleep(policy.backoff(attempt)).await;
            match self.dial().await {
                Ok(connection) => {
                    *lock(&self.inner.current) = Some(Arc::clone(&connection));
                    return Ok(connection);
                }
                // Refused by the server for a reason a redial does not fix.
                Err(error @ ClientError::Server { code, .. })
                    if code != v1::ErrorCode::Unavailable =>
                {
                    return Err(error);
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    fn live_connection(&self) -> Option<Arc<Connection>> {
        lock(&self.inner.current)
            .as_ref()
            .filter(|connection| !connection.shared.is_closed())
            .cloned()
    }

    /// Dials and does the handshake, within the connect timeout.
    async fn dial(&self) -> Result<Arc<Connection>, ClientError> {
        let token = lock(&self.inner.token).clone();
        let options = &self.inner.options;
        let opening = Connection::open(&self.inner.addr, options, token, &self.inner.pushes);
        match tokio::time::timeout(options.connect_timeout, opening).await {
            Ok(result) => result.map(Arc::new),
            Err(_) => Err(ClientError::Timeout),
        }
    }
}

/// Typed methods: each sends one request kind and unwraps its response kind.
macro_rules! typed_requests {
    ($(
        $(#[$doc:meta])*
        $method:ident($request_kind:ident: $request:ty) -> $response_kind:ident($response:ty);
    )*) => {
        impl Client {
            $(
                $(#[$doc])*
                ///
                /// Errors and retries as [`Client::call`].
                pub async fn $method(&self, request: $request) -> Result<$response, ClientError> {
                    match self.call(request::Kind::$request_kind(request)).await? {
                        response::Kind::$response_kind(response) => Ok(response),
                        other => Err(unexpected_response(stringify!($method), &other)),
                    }
                }
            )*
        }
    };
}

typed_requests! {
    /// Echoes a nonce, with the server's clock.
    ping(Ping: v1::PingRequest) -> Ping(v1::PingResponse);
    /// Creates a user.
    create_user(CreateUser: v1::CreateUserRequest) -> CreateUser(v1::CreateUserResponse);
    /// Logs in one device; the returned session token authenticates later reconnects.
    login(Login: v1::LoginRequest) -> Login(v1::LoginResponse);
    /// Lists the caller's sessions.
    list_sessions(ListSessions: v1::ListSessionsRequest) -> ListSessions(v1::ListSessionsResponse);
    /// Ends one of the caller's sessions.
    revoke_session(RevokeSession: v1::RevokeSessionRequest) -> RevokeSession(v1::RevokeSessionResponse);
    /// Creates a direct chat, group or channel.
    create_chat(CreateChat: v1::CreateChatRequest) -> CreateChat(v1::CreateChatResponse);
    /// Adds a user to a group or channel.
    invite(Invite: v1::InviteRequest) -> EventAck(v1::EventAck);
    /// Removes a member from a group or channel.
    remove_member(RemoveMember: v1::RemoveMemberRequest) -> EventAck(v1::EventAck);
    /// The caller leaves a chat.
    leave_chat(LeaveChat: v1::LeaveChatRequest) -> EventAck(v1::EventAck);
    /// Bans a user from a chat.
    ban(Ban: v1::BanRequest) -> EventAck(v1::EventAck);
    /// Lifts a ban.
    unban(Unban: v1::UnbanRequest) -> EventAck(v1::EventAck);
    /// Changes a member's role.
    set_role(SetRole: v1::SetRoleRequest) -> EventAck(v1::EventAck);
    /// The caller joins a channel.
    join_chat(JoinChat: v1::JoinChatRequest) -> EventAck(v1::EventAck);
    /// Lists the caller's chats.
    list_chats(ListChats: v1::ListChatsRequest) -> ListChats(v1::ListChatsResponse);
    /// Lists a chat's members.
    list_members(ListMembers: v1::ListMembersRequest) -> ListMembers(v1::ListMembersResponse);
    /// Posts a message; with a non-zero `client_message_id` it is repeated across drops
    /// with that same id, and the server answers a repeat with the original seq.
    send_message(SendMessage: v1::SendMessageRequest) -> SendMessage(v1::SendMessageResponse);
    /// Replaces the text of one of the caller's messages.
    edit_message(EditMessage: v1::EditMessageRequest) -> EventAck(v1::EventAck);
    /// Deletes a message.
    delete_message(DeleteMessage: v1::DeleteMessageRequest) -> EventAck(v1::EventAck);
    /// Adds or removes the caller's reaction.
    react(React: v1::ReactRequest) -> EventAck(v1::EventAck);
    /// Pins or unpins a message.
    pin(Pin: v1::PinRequest) -> EventAck(v1::EventAck);
    /// Reads a page of a chat's log.
    history(History: v1::HistoryRequest) -> History(v1::HistoryResponse);
    /// Reads chosen events of a chat.
    get_by_seq(GetBySeq: v1::GetBySeqRequest) -> GetBySeq(v1::GetBySeqResponse);
    /// Moves the caller's read marker forward.
    mark_read(MarkRead: v1::MarkReadRequest) -> MarkRead(v1::MarkReadResponse);
    /// Reads unread counts.
    get_unread_counts(GetUnreadCounts: v1::GetUnreadCountsRequest) -> GetUnreadCounts(v1::GetUnreadCountsResponse);
    /// Follows a chat: its events arrive on [`Client::pushes`] with this request's id,
    /// which [`Client::subscribe`] does not return; use [`Client::subscribe_with_id`]
    /// to learn it.
    subscribe(Subscribe: v1::SubscribeRequest) -> Subscribe(v1::SubscribeResponse);
    /// Ends a subscription.
    unsubscribe(Unsubscribe: v1::UnsubscribeRequest) -> Unsubscribe(v1::UnsubscribeResponse);
    /// Catches a device up: per chat, the events after the seq it holds (a bounded page,
    /// with `too_long` when the rest must be paged with history), head and unread count.
    sync(Sync: v1::SyncRequest) -> Sync(v1::SyncResponse);
    /// Tells the chat's other online members that the caller is typing (or stopped).
    typing(Typing: v1::TypingRequest) -> Typing(v1::TypingResponse);
    /// Reads users' presence and follows it (changes arrive as presence pushes).
    get_presence(GetPresence: v1::GetPresenceRequest) -> GetPresence(v1::GetPresenceResponse);
    /// Creates a bot owned by the caller; the answer carries its API token.
    create_bot(CreateBot: v1::CreateBotRequest) -> CreateBot(v1::CreateBotResponse);
    /// Lists the caller's bots.
    list_bots(ListBots: v1::ListBotsRequest) -> ListBots(v1::ListBotsResponse);
    /// Replaces one of the caller's bots' token.
    reset_bot_token(ResetBotToken: v1::ResetBotTokenRequest) -> ResetBotToken(v1::CreateBotResponse);
    /// Opens a resumable media upload (see [`Client::upload_file`] for the whole flow).
    media_upload_start(MediaUploadStart: v1::MediaUploadStartRequest) -> MediaUploadStart(v1::MediaUploadStartResponse);
    /// Stores one part of an upload; answered once it is durable.
    media_upload_part(MediaUploadPart: v1::MediaUploadPartRequest) -> MediaUploadPart(v1::MediaUploadPartResponse);
    /// Which parts of an upload the server holds.
    media_upload_status(MediaUploadStatus: v1::MediaUploadStatusRequest) -> MediaUploadStatus(v1::MediaUploadStatusResponse);
    /// Checks the hash of a complete upload and stores the file.
    media_upload_finish(MediaUploadFinish: v1::MediaUploadFinishRequest) -> MediaUploadFinish(v1::MediaUploadFinishResponse);
    /// Reads a byte range of a stored file.
    media_download(MediaDownload: v1::MediaDownloadRequest) -> MediaDownload(v1::MediaDownloadResponse);
    /// Describes a stored file.
    media_info(MediaInfo: v1::MediaInfoRequest) -> MediaInfo(v1::MediaInfoResponse);
}

impl Client {
    /// Follows a chat, and returns the subscription's id (its request id, which its
    /// pushes carry and [`Client::unsubscribe`] takes) with the response. Not repeated
    /// after a drop: a subscription lives on one connection.
    pub async fn subscribe_with_id(
        &self,
        request: v1::SubscribeRequest,
    ) -> Result<(u64, v1::SubscribeResponse), ClientError> {
        let connection = self.connection().await?;
        let (request_id, response) = connection
            .request_with_id(
                &request::Kind::Subscribe(request),
                self.inner.options.request_timeout,
            )
            .await?;
        match response {
            response::Kind::Subscribe(response) => Ok((request_id, response)),
            other => Err(unexpected_response("subscribe", &other)),
        }
    }
}

pub(crate) fn unexpected_response(method: &str, response: &response::Kind) -> ClientError {
    ClientError::Protocol(format!(
        "{method} was answered with {}",
        response_name(response)
    ))
}

fn response_name(response: &response::Kind) -> &'static str {
    use response::Kind;
    match response {
        Kind::HandshakeOk(_) => "handshake_ok",
        Kind::Error(_) => "error",
        Kind::Ping(_) => "ping",
        Kind::CreateUser(_) => "create_user",
        Kind::Login(_) => "login",
        Kind::ListSessions(_) => "list_sessions",
        Kind::RevokeSession(_) => "revoke_session",
        Kind::CreateChat(_) => "create_chat",
        Kind::EventAck(_) => "event_ack",
        Kind::ListChats(_) => "list_chats",
        Kind::ListMembers(_) => "list_members",
        Kind::SendMessage(_) => "send_message",
        Kind::History(_) => "history",
        Kind::GetBySeq(_) => "get_by_seq",
        Kind::MarkRead(_) => "mark_read",
        Kind::GetUnreadCounts(_) => "get_unread_counts",
        Kind::Subscribe(_) => "subscribe",
        Kind::Unsubscribe(_) => "unsubscribe",
        Kind::Sync(_) => "sync",
        Kind::Typing(_) => "typing",
        Kind::GetPresence(_) => "get_presence",
        Kind::CreateBot(_) => "create_bot",
        Kind::ListBots(_) => "list_bots",
        Kind::ResetBotToken(_) => "reset_bot_token",
        Kind::Secret(_) => "secret",
        Kind::MediaUploadStart(_) => "media_upload_start",
        Kind::MediaUploadPart(_) => "media_upload_part",
        Kind::MediaUploadStatus(_) => "media_upload_status",
        Kind::MediaUploadFinish(_) => "media_upload_finish",
        Kind::MediaDownload(_) => "media_download",
        Kind::MediaInfo(_) => "media_info",
    }
}

/// Whether repeating `kind` after an unknown outcome is harmless (`PROTOCOL.md`,
/// "Retries and idempotency"). Subscriptions are left out: one lives on one connection,
/// and its pushes tell the application when it ended.
fn is_repeatable(kind: &request::Kind) -> bool {
    use request::Kind;
    match kind {
        Kind::SendMessage(send) => send.client_message_id != 0,
        Kind::Ping(_)
        | Kind::History(_)
        | Kind::GetBySeq(_)
        | Kind::MarkRead(_)
        | Kind::GetUnreadCounts(_)
        | Kind::ListChats(_)
        | Kind::ListMembers(_)
        | Kind::ListSessions(_)
        | Kind::Sync(_)
        | Kind::Typing(_)
        | Kind::GetPresence(_)
        | Kind::ListBots(_) => true,
        // Secret chats: everything but `send` is safe to repeat (a repeated `start`
        // carries the same one-time key and returns the same chat; `ack` is "up to").
        Kind::Secret(s) => !matches!(s.kind, Some(v1::secret_request::Kind::Send(_)) | None),
        // Media: a part already held is acknowledged again; finishing a finished upload
        // answers the same reference; the rest are reads.
        Kind::MediaUploadPart(_)
        | Kind::MediaUploadStatus(_)
        | Kind::MediaUploadFinish(_)
        | Kind::MediaDownload(_)
        | Kind::MediaInfo(_) => true,
        _ => false,
    }
}

/// A mutex whose holder panicked still guards consistent data here: every critical
/// section is a single map or option update.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One TCP connection after its handshake: the writer and reader tasks and what they
/// share. Dropping it stops both tasks.
#[derive(Debug)]
struct Connection {
    shared: Arc<ConnectionShared>,
    /// Encoded frames for the writer task; room for every request in flight.
    outgoing: mpsc::Sender<OutFrame>,
    /// In-flight slots: the smaller of the client's and the server's limits.
    in_flight: Arc<Semaphore>,
    handshake: v1::HandshakeOk,
    /// The server's frame limit, for the requests sent.
    frame_bytes_max: u32,
    reader_task: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

/// State of one connection shared by callers and its reader and writer tasks.
#[derive(Debug)]
struct ConnectionShared {
    /// Requests sent and not yet answered, by request id; empty once closed.
    pending: Mutex<HashMap<u64, Pending>>,
    /// Subscriptions the server has accepted and not ended: each keeps its in-flight slot,
    /// as on the server.
    subscriptions: Mutex<HashMap<u64, OwnedSemaphorePermit>>,
    /// The next request id; ids are never reused on one connection.
    next_request_id: AtomicU64,
    /// Set once, under the `pending` lock, when either task stops.
    closed: AtomicBool,
    pushes: Arc<PushShared>,
    /// True while the reader sweeps deadlines ([`TIMEOUT_SWEEP_FRACTION`]); read and
    /// written only under the `pending` lock. The reader clears it when no request waits
    /// for an answer (an idle connection has no timer), and the next request sets it and
    /// wakes the reader through `sweep_wanted`.
    sweeping: AtomicBool,
    sweep_wanted: tokio::sync::Notify,
}

/// A request waiting for its response.
#[derive(Debug)]
struct Pending {
    /// `None` once the caller was told [`ClientError::Timeout`] (the entry stays, holding
    /// its permit, until the server answers).
    reply: Option<oneshot::Sender<Result<response::Kind, ClientError>>>,
    /// When the caller is told [`ClientError::Timeout`] (by the reader's sweep).
    deadline: Instant,
    /// Released when the response arrives (or, for a subscription, when it ends): the
    /// server counts the request in flight until then even if the caller gave up.
    permit: OwnedSemaphorePermit,
    /// For an `unsubscribe`: the subscription it ends.
    ends_subscription: Option<u64>,
}

impl ConnectionShared {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Tells every pending caller whose deadline passed [`ClientError::Timeout`] (the
    /// entries stay until the server answers: it counts them in flight until then).
    /// Returns whether a caller still waits; if none does, the sweep stops (`sweeping`
    /// cleared under the lock, so a request registered next sees it and restarts it).
    fn sweep(&self, now: Instant) -> bool {
        let mut pending = lock(&self.pending);
        let mut waiting = false;
        for entry in pending.values_mut() {
            if entry.reply.is_none() {
                continue;
            }
            if entry.deadline <= now {
                if let Some(reply) = entry.reply.take() {
                    let _ = reply.send(Err(ClientError::Timeout));
                }
            } else {
                waiting = true;
            }
        }
        if !waiting {
            self.sweeping.store(false, Ordering::Relaxed);
        }
        waiting
    }

    /// Marks the connection dead and fails every pending request with `Disconnected`
    /// (their senders are dropped).
    fn close(&self) {
        let pending = {
            let mut pending = lock(&self.pending);
            if self.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            std::mem::take(&mut *pending)
        };
        drop(pending);
        lock(&self.subscriptions).clear();
        self.pushes.deliver(PushItem::ConnectionLost);
    }

    /// Routes one frame from the server. An error means the server broke the protocol.
    fn route(&self, frame: v1::Frame) -> Result<(), String> {
        match frame.body {
            Some(v1::frame::Body::Response(response)) => {
                let entry = lock(&self.pending).remove(&frame.request_id);
                // An id nobody waits for: a late answer after the connection's pending
                // table was cleared. Nothing to do.
                let Some(entry) = entry else {
                    return Ok(());
                };
                let result = match response.kind {
                    Some(response::Kind::Error(error)) => Err(ClientError::from_proto(error)),
                    Some(response::Kind::Subscribe(subscribed)) => {
                        // A subscription whose caller timed out is not kept: nobody
                        // knows its id. Its slot is released when it ends.
                        lock(&self.subscriptions).insert(frame.request_id, entry.permit);
                        if let Some(reply) = entry.reply {
                            let _ = reply.send(Ok(response::Kind::Subscribe(subscribed)));
                        }
                        return Ok(());
                    }
                    Some(kind) => {
                        if let Some(subscription) = entry.ends_subscription {
                            lock(&self.subscriptions).remove(&subscription);
                        }
                        Ok(kind)
                    }
                    None => Err(ClientError::Protocol("an empty response".into())),
                };
                // The caller may have timed out and gone; that is fine.
                if let Some(reply) = entry.reply {
                    let _ = reply.send(result);
                }
                drop(entry.permit);
                Ok(())
            }
            Some(v1::frame::Body::Push(push)) => {
                // A push kind newer than this client is skipped.
                let Some(kind) = push.kind else {
                    return Ok(());
                };
                if matches!(kind, push::Kind::SubscriptionEnded(_)) {
                    lock(&self.subscriptions).remove(&frame.request_id);
                }
                self.pushes.deliver(PushItem::Push {
                    request_id: frame.request_id,
                    push: kind,
                });
                Ok(())
            }
            Some(v1::frame::Body::Request(_)) => Err("the server sent a request".into()),
            None => Err("a frame with no body".into()),
        }
    }
}

impl Connection {
    /// Dials `addr`, does the handshake, and starts the reader and writer tasks.
    async fn open(
        addr: &str,
        options: &ClientOptions,
        token: Option<String>,
        pushes: &Arc<PushShared>,
    ) -> Result<Connection, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(ClientError::Io)?;
        // Requests are small and latency matters more than packet count; the writer
        // task already coalesces what is queued.
        stream.set_nodelay(true).map_err(ClientError::Io)?;
        let (read_half, mut write_half) = stream.into_split();

        let handshake = v1::Frame::request(
            HANDSHAKE_REQUEST_ID,
            request::Kind::Handshake(v1::Handshake {
                protocol_version: PROTOCOL_VERSION,
                client_name: options.client_name.clone(),
                session_token: token.unwrap_or_default(),
                no_live_pushes: !options.live_pushes,
            }),
        );
        let mut bytes = BytesMut::new();
        encode_message(&handshake, FRAME_BYTES_MAX, &mut bytes).map_err(ClientError::Encode)?;
        write_half
            .write_all(&bytes)
            .await
            .map_err(|_| ClientError::Disconnected)?;

        let mut reader = FrameReader::new(read_half, FRAME_BYTES_MAX);
        let payload = match reader.next_frame().await {
            Ok(Some(payload)) => payload,
            Ok(None) | Err(crate::Error::Io { .. }) => return Err(ClientError::Disconnected),
            Err(error) => return Err(ClientError::Protocol(error.to_string())),
        };
        let frame: v1::Frame =
            decode_message(payload).map_err(|error| ClientError::Protocol(error.to_string()))?;
        let handshake = match frame.body {
            Some(v1::frame::Body::Response(v1::Response {
                kind: Some(response::Kind::HandshakeOk(ok)),
            })) => ok,
            Some(v1::frame::Body::Response(v1::Response {
                kind: Some(response::Kind::Error(error)),
            })) => return Err(ClientError::from_proto(error)),
            Some(v1::frame::Body::Push(v1::Push {
                kind: Some(push::Kind::Disconnect(disconnect)),
            })) => {
                return Err(ClientError::from_proto(disconnect.reason.unwrap_or_else(
                    || v1::Error::new(v1::ErrorCode::Internal, "disconnected"),
                )));
            }
            _ => {
                return Err(ClientError::Protocol(
                    "the handshake was not answered with handshake_ok".into(),
                ));
            }
        };
        if handshake.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "the server speaks protocol version {}, this client only {PROTOCOL_VERSION}",
                handshake.protocol_version
            )));
        }
        let limits = handshake.limits.unwrap_or_default();
        let frame_bytes_max = if limits.frame_bytes_max == 0 {
            FRAME_BYTES_MAX
        } else {
            limits.frame_bytes_max
        };
        reader.set_frame_bytes_max(frame_bytes_max);
        let mut in_flight_max = options.requests_in_flight_max.max(1);
        if limits.requests_in_flight_max > 0 {
            in_flight_max = in_flight_max.min(limits.requests_in_flight_max as usize);
        }

        let shared = Arc::new(ConnectionShared {
            pending: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            next_request_id: AtomicU64::new(HANDSHAKE_REQUEST_ID + 1),
            closed: AtomicBool::new(false),
            pushes: Arc::clone(pushes),
            sweeping: AtomicBool::new(false),
            sweep_wanted: tokio::sync::Notify::new(),
        });
        let (outgoing, queued) = mpsc::channel(in_flight_max);
        let writer_task = tokio::spawn(write_loop(write_half, queued, Arc::clone(&shared)));
        let reader_task = tokio::spawn(read_loop(
            reader,
            Arc::clone(&shared),
            sweep_period(options.request_timeout),
        ));
        Ok(Connection {
            shared,
            outgoing,
            in_flight: Arc::new(Semaphore::new(in_flight_max)),
            handshake,
            frame_bytes_max,
            reader_task,
            writer_task,
        })
    }

    async fn request(
        &self,
        kind: &request::Kind,
        timeout: Duration,
    ) -> Result<response::Kind, ClientError> {
        self.request_with_id(kind, timeout)
            .await
            .map(|(_, response)| response)
    }

    /// Sends one request and waits for its response, within `timeout`.
    async fn request_with_id(
        &self,
        kind: &request::Kind,
        timeout: Duration,
    ) -> Result<(u64, response::Kind), ClientError> {
        let ends_subscription = match kind {
            request::Kind::Unsubscribe(unsubscribe) => Some(unsubscribe.subscription_id),
            _ => None,
        };
        // No timer per call: the reader's sweep tells a caller still waiting at its
        // deadline `Timeout` (TIMEOUT_SWEEP_FRACTION). Only waiting for a slot, which a
        // request rarely does, is bounded by a timer of its own.
        let deadline = Instant::now() + timeout;
        let attempt = async {
            let permit = match Arc::clone(&self.in_flight).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    tokio::time::timeout_at(deadline, Arc::clone(&self.in_flight).acquire_owned())
                        .await
                        .map_err(|_| ClientError::Timeout)?
                        .expect("the in-flight semaphore is never closed")
                }
            };
            let request_id = self.shared.next_request_id.fetch_add(1, Ordering::Relaxed);
            // From the borrowed request: the caller keeps it for a retry, uncopied (a
            // media part's bytes not even into the frame: they follow its head).
            let (head, tail) = encode::encode_request_split(request_id, kind, self.frame_bytes_max)
                .map_err(ClientError::Encode)?;
            let (reply, response) = oneshot::channel();
            {
                // Registered before the bytes go out, so the response always finds it;
                // and under the lock that `close` takes, so a request registered on a
                // closing connection is failed by it rather than forgotten.
                let mut pending = lock(&self.shared.pending);
                if self.shared.is_closed() {
                    return Err(ClientError::Disconnected);
                }
                pending.insert(
                    request_id,
                    Pending {
                        reply: Some(reply),
                        deadline,
                        permit,
                        ends_subscription,
                    },
                );
                if !self.shared.sweeping.load(Ordering::Relaxed) {
                    self.shared.sweeping.store(true, Ordering::Relaxed);
                    self.shared.sweep_wanted.notify_one();
                }
            }
            if self.outgoing.send(OutFrame { head, tail }).await.is_err() {
                lock(&self.shared.pending).remove(&request_id);
                return Err(ClientError::Disconnected);
            }
            match response.await {
                Ok(result) => result.map(|response| (request_id, response)),
                // The connection closed and dropped the sender.
                Err(_) => Err(ClientError::Disconnected),
            }
        };
        // On a timeout the request stays pending: its slot is released only when the
        // server answers, since the server counts it in flight until then.
        attempt.await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader_task.abort();
        self.writer_task.abort();
        self.shared.close();
    }
}

/// One frame for the writer task: `head`, then `tail` (empty but for a media part,
/// whose bytes are sent from their own buffer: `encode::encode_request_split`).
#[derive(Debug)]
struct OutFrame {
    head: Bytes,
    tail: Bytes,
}

impl OutFrame {
    /// Written as it is rather than copied into the batch: a media part, or a frame of
    /// a batch's size or more.
    fn goes_alone(&self) -> bool {
        !self.tail.is_empty() || self.head.len() >= WRITE_BATCH_BYTES_MAX
    }
}

/// Writes `head` then `tail` with vectored writes (one `writev` for both, usually).
async fn write_both(stream: &mut OwnedWriteHalf, head: &[u8], tail: &[u8]) -> std::io::Result<()> {
    let (mut head, mut tail) = (head, tail);
    while !head.is_empty() || !tail.is_empty() {
        let bufs = [std::io::IoSlice::new(head), std::io::IoSlice::new(tail)];
        let n = stream.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        tail = &tail[n - from_head..];
    }
    Ok(())
}

/// The writer task: writes queued frames, coalescing what is queued into one `write`.
async fn write_loop(
    mut stream: OwnedWriteHalf,
    mut queued: mpsc::Receiver<OutFrame>,
    shared: Arc<ConnectionShared>,
) {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH_BYTES_MAX);
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(frame) => frame,
            None => match queued.recv().await {
                Some(frame) => frame,
                None => break,
            },
        };
        // A media part or a frame of a batch's size or more goes out as it is, without
        // a copy into the batch.
        if first.goes_alone() {
            if write_both(&mut stream, &first.head, &first.tail)
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        batch.extend_from_slice(&first.head);
        // Let the callers that are ready now run first: the request that woke this task
        // is usually the first of a burst (callers answered by one response batch each
        // send their next request, and tokio runs a woken task next), so one yield turns
        // a `write` per request into one per burst. Alone, it costs one scheduler pass.
        tokio::task::yield_now().await;
        while batch.len() < WRITE_BATCH_BYTES_MAX {
            match queued.try_recv() {
                Ok(frame) if frame.goes_alone() => {
                    // Written after the batch, in order.
                    next = Some(frame);
                    break;
                }
                Ok(frame) => batch.extend_from_slice(&frame.head),
                Err(_) => break,
            }
        }
        if stream.write_all(&batch).await.is_err() {
            break;
        }
        batch.clear();
    }
    shared.close();
}

/// The reader task: routes each frame until the stream ends or breaks the protocol.
///
/// It also enforces the pending requests' deadlines: every `sweep_every` while a caller
/// waits ([`ConnectionShared::sweep`]); while none does, it holds no timer.
async fn read_loop(
    mut reader: FrameReader<OwnedReadHalf>,
    shared: Arc<ConnectionShared>,
    sweep_every: Duration,
) {
    let sweep = tokio::time::sleep(sweep_every);
    tokio::pin!(sweep);
    let mut sweeping = false;
    loop {
        let next = tokio::select! {
            biased;
            next = reader.next_frame() => next,
            () = &mut sweep, if sweeping => {
                let now = Instant::now();
                sweeping = shared.sweep(now);
                sweep.as_mut().reset(now + sweep_every);
                continue;
            }
            () = shared.sweep_wanted.notified(), if !sweeping => {
                sweeping = true;
                sweep.as_mut().reset(Instant::now() + sweep_every);
                continue;
            }
        };
        let Ok(Some(payload)) = next else { break };
        // A live push that would be dropped anyway (nobody drains the queue: a load
        // generator, a CLI `send`) is counted without decoding it: the same outcome as
        // decoding and dropping it, without the allocations of its events. Only live
        // pushes (request id 0) are skipped; they change no connection state here.
        if shared.pushes.dropping() && is_live_push(&payload) {
            shared.pushes.drop_one();
            continue;
        }
        let Ok(frame) = decode_message::<v1::Frame>(payload) else {
            break;
        };
        if shared.route(frame).is_err() {
            break;
        }
    }
    shared.close();
}

/// Whether a `Frame` payload is a push with request id 0 (a live push), from its first
/// bytes: `request_id` (field 1) is absent or 0, then `push` (field 4, length-delimited,
/// key byte 0x22) comes first. Anything else, including a differently ordered encoding
/// of a live push, answers false and is decoded as usual.
fn is_live_push(payload: &[u8]) -> bool {
    // Field 1 as a varint 0 (0x08 0x00), which an encoder may write although proto3
    // leaves it out.
    let body = match payload {
        [0x08, 0x00, rest @ ..] => rest,
        other => other,
    };
    body.first() == Some(&0x22)
}

mod encode;
mod secret;
pub use secret::SecretFlowError;
mod media;
pub use media::{
    DOWNLOAD_IN_FLIGHT_MAX, DownloadCheck, DownloadOptions, TransferProgress,
    UPLOAD_PARTS_IN_FLIGHT_MAX, UploadOptions, media_id_hex, parse_media_id,
};

#[cfg(test)]
mod tests;
