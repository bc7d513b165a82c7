//! One client connection: handshake, the read loop, request tasks (and the short requests
//! polled inline on the connection's own task), the outbox and its
//! writer task, pushes, and closing.
//!
//! Everything a connection sends goes through its [`Outbox`]: one bounded queue drained
//! by one writer task. The queue never fills, because each kind of frame has its own
//! budget, checked before it is queued: responses one per request in flight (a request
//! leaves the in-flight table only when the writer has taken its response), the gateway's
//! own answers [`IMMEDIATE_RESPONSES_MAX`] (a semaphore; the read loop waits for it), and
//! pushes `push_queue_len_max` frames and `push_queue_bytes_max` bytes (beyond, the
//! connection is closed as a slow reader; [`PushSender::room`] lets a sender that can
//! wait, such as a subscription catching up, wait for room instead).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use chatlog_wire::frame::{FrameReader, decode_message, encode_message};
use chatlog_wire::limits::{CLIENT_NAME_BYTES_MAX, FRAME_PREFIX_BYTES};
use chatlog_wire::proto::v1::{self, ErrorCode, frame, push, request, response};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::panic::AssertUnwindSafe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::{
    ConnCtx, GatewayLimits, IMMEDIATE_RESPONSES_MAX, IN_FLIGHT_RETRY_AFTER_MS, LINGER_BYTES_MAX,
    LINGER_TIMEOUT, PROTOCOL_VERSIONS, Principal, REFUSED_RETRY_AFTER_MS, SERVER_NAME, Service,
    WRITE_BATCH_BYTES_MAX, WRITE_BATCH_FRAMES_MAX, configure,
};

/// Bytes of one connection's answer buffer: small frames (responses, the gateway's own
/// answers, subscription pushes of up to a quarter of it) are encoded one after another
/// into a shared chunk of this size and handed to the writer as slices of it, instead of
/// one allocation per frame (a post's answer is ~30 bytes; at load the gateway answers
/// ~100,000 a second). Why 4 KiB: ~100 post answers per chunk make the allocation rare,
/// while a connection that answered holds at most this much more than one that did not
/// (its 16 KiB read buffer is already four times that); the chunk is freed once the last
/// frame cut from it was written and a new chunk replaced it.
pub const ANSWER_BUFFER_BYTES: usize = 4 * 1024;

/// Why a push was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The connection has closed (or is closing).
    #[error("the connection is closed")]
    Closed,
    /// The connection's push queue was full: the connection is being closed with
    /// `Disconnect(RATE_LIMITED)`.
    #[error("the client reads too slowly; its connection is being closed")]
    SlowReader,
    /// The push does not fit in one frame; nothing was sent, the connection is fine.
    #[error("the push is over the frame limit")]
    TooLarge,
}

// ---- ops metrics (issue 7): push counters ----
/// Pushes queued to client connections and connections cut off as slow readers, for
/// `/metrics`. Process-wide: a `chatlog serve` process runs one node, and counting in
/// [`PushSender`] (which every push goes through) needs no change anywhere else.
#[derive(Debug, Default)]
pub struct PushCounters {
    /// Pushes queued to a connection (one per connection a push reached).
    pub queued: std::sync::atomic::AtomicU64,
    /// Pushes refused because the connection's queue was full (the connection closes).
    pub slow_reader_cutoffs: std::sync::atomic::AtomicU64,
}

/// The process's [`PushCounters`].
pub static PUSH_COUNTERS: PushCounters = PushCounters {
    queued: std::sync::atomic::AtomicU64::new(0),
    slow_reader_cutoffs: std::sync::atomic::AtomicU64::new(0),
};

impl PushCounters {
    fn count(&self, r: &Result<(), PushError>) {
        use std::sync::atomic::Ordering::Relaxed;
        match r {
            Ok(()) => self.queued.fetch_add(1, Relaxed),
            Err(PushError::SlowReader) => self.slow_reader_cutoffs.fetch_add(1, Relaxed),
            Err(_) => 0,
        };
    }
}
// ---- end ops metrics ----

/// Sends pushes to one connection. Cheap to clone; never blocks and never buffers past
/// the connection's `push_queue_len_max`.
#[derive(Debug, Clone)]
pub struct PushSender {
    outbox: Arc<Outbox>,
}

impl PushSender {
    /// Queues a push: `request_id` is the subscribe request's id for a subscription's
    /// pushes, 0 for the others. A full queue closes the connection
    /// ([`PushError::SlowReader`]); the caller should forget the connection then.
    pub fn push(&self, request_id: u64, kind: push::Kind) -> Result<(), PushError> {
        let r = self.outbox.push(request_id, kind);
        PUSH_COUNTERS.count(&r);
        r
    }

    /// Queues a push encoded once for many connections (live fan-out). The same as
    /// [`PushSender::push`] with request id 0, without encoding it again per connection:
    /// the connections share the frame's bytes.
    pub fn push_shared(&self, push: &SharedPush) -> Result<(), PushError> {
        let r = self.outbox.push_frame(0, push.frame.clone(), None);
        PUSH_COUNTERS.count(&r);
        r
    }

    /// Waits until the connection's queued pushes take at most half of its byte budget
    /// (or it closed: the next push then fails). For senders that can wait, such as a
    /// subscription catching up from history, so that only live pushes, which cannot
    /// wait, ever cut a connection off for reading slowly.
    pub async fn room(&self) {
        loop {
            let notified = self.outbox.room.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake between the two is not lost.
            notified.as_mut().enable();
            {
                let state = self.outbox.state();
                if state.closed || state.push_bytes_queued <= self.outbox.push_queue_bytes_max / 2 {
                    return;
                }
            }
            notified.await;
        }
    }

    /// True once the connection is closing or closed; pushes then fail.
    pub fn is_closed(&self) -> bool {
        self.outbox.state().closed
    }

    /// Closes the connection: queued responses are written, then a `Disconnect` with
    /// `reason` (what [`ConnCtx::disconnect`] does, for holders of a sender only).
    pub fn disconnect(&self, reason: v1::Error) {
        self.outbox.close(Close::Disconnect(reason));
    }
}

/// A live push (request id 0) encoded once, to be queued on many connections with
/// [`PushSender::push_shared`]; its bytes are shared, not copied.
#[derive(Debug, Clone)]
pub struct SharedPush {
    frame: Bytes,
}

impl SharedPush {
    /// Encodes `kind` as a push frame with request id 0, or `None` when it is over the
    /// protocol's frame limit (a connection with a lower limit refuses it as too large).
    pub fn new(kind: push::Kind) -> Option<SharedPush> {
        let mut bytes = BytesMut::new();
        encode_message(
            &v1::Frame::push(0, kind),
            chatlog_wire::limits::FRAME_BYTES_MAX,
            &mut bytes,
        )
        .ok()?;
        Some(SharedPush {
            frame: bytes.freeze(),
        })
    }
}

/// How a connection ends.
#[derive(Debug, Clone)]
enum Close {
    /// Write what is queued (responses, not pushes), then this `Disconnect`.
    Disconnect(v1::Error),
    /// Just close: the peer is gone or the stream is out of step mid-frame.
    Silent,
}

/// A frame waiting for the writer task, with what to do once it is taken.
#[derive(Debug)]
enum Outgoing {
    /// The response to a request in flight.
    Response {
        request_id: u64,
        frame: Bytes,
        /// Written right after `frame`, part of the same frame: a media download's
        /// bytes, sent from their own buffer (`chatlog_wire::frame::split`). Usually empty.
        tail: Bytes,
        after: AfterResponse,
    },
    /// A push; `ends_subscription` for a `SubscriptionEnded`.
    Push {
        frame: Bytes,
        ends_subscription: Option<u64>,
    },
    /// An answer of the gateway's own; the permit is its slot.
    Immediate {
        frame: Bytes,
        _slot: OwnedSemaphorePermit,
    },
}

/// What a response does to the in-flight table when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterResponse {
    /// The request is done.
    Done,
    /// A subscription started: the id stays in flight until it ends.
    Subscribed,
    /// A subscription ended by `unsubscribe`: that id leaves too.
    Unsubscribed(u64),
}

/// A request id's state in the in-flight table.
#[derive(Debug)]
enum InFlight {
    /// Its handler runs; pushes for it wait here until its response is queued.
    Running { held: Vec<(Bytes, Option<u64>)> },
    /// Its response is queued.
    Answered,
    /// A live subscription.
    Subscribed,
}

#[derive(Debug, Default)]
struct OutboxState {
    /// Requests in flight by id; at most `requests_in_flight_max` entries.
    requests: HashMap<u64, InFlight>,
    /// Pushes queued or held; at most `push_queue_len_max`.
    pushes_queued: usize,
    /// Their bytes; at most `push_queue_bytes_max` (or one push).
    push_bytes_queued: usize,
    closed: bool,
}

/// What one connection sends, and the accounting that bounds it.
#[derive(Debug)]
struct Outbox {
    queue: mpsc::Sender<Outgoing>,
    state: Mutex<OutboxState>,
    immediate_slots: Arc<Semaphore>,
    close: watch::Sender<Option<Close>>,
    requests_in_flight_max: usize,
    push_queue_len_max: usize,
    push_queue_bytes_max: usize,
    /// Woken whenever the writer takes a push off the queue, and when the outbox closes.
    room: tokio::sync::Notify,
    frame_bytes_max: u32,
    /// The rest of the chunk small frames are encoded into ([`ANSWER_BUFFER_BYTES`]).
    /// Its own lock, held only while one frame is encoded: answers are encoded by the
    /// connection's task and by request tasks, never under `state`.
    answer_buffer: Mutex<BytesMut>,
}

impl PushSender {
    /// A sender whose connection is already closed: every push is refused with
    /// [`PushError::Closed`]. For a [`super::ConnCtx::detached`].
    pub(super) fn closed() -> PushSender {
        let (queue, _) = mpsc::channel(1);
        let (close, _) = watch::channel(Some(Close::Silent));
        PushSender {
            outbox: Arc::new(Outbox {
                queue,
                state: Mutex::new(OutboxState {
                    closed: true,
                    ..OutboxState::default()
                }),
                immediate_slots: Arc::new(Semaphore::new(0)),
                close,
                requests_in_flight_max: 0,
                push_queue_len_max: 0,
                push_queue_bytes_max: 0,
                room: tokio::sync::Notify::new(),
                frame_bytes_max: 0,
                answer_buffer: Mutex::new(BytesMut::new()),
            }),
        }
    }
}

impl Outbox {
    fn state(&self) -> MutexGuard<'_, OutboxState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts closing; the first reason wins.
    fn close(&self, reason: Close) {
        self.state().closed = true;
        self.room.notify_waiters();
        self.close.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
    }

    /// Queues a frame that has a budget. The budgets make the queue's capacity enough,
    /// so a full queue is a bug; it closes the connection rather than wait.
    fn enqueue(&self, outgoing: Outgoing) {
        if let Err(error) = self.queue.try_send(outgoing) {
            debug_assert!(
                matches!(error, mpsc::error::TrySendError::Closed(_)),
                "the outbox queue overflowed its budgets"
            );
            self.close(Close::Silent);
        }
    }

    /// Encodes a frame, or `None` when it is over the frame limit. A small frame is cut
    /// from the connection's answer buffer (no allocation of its own); a larger one gets
    /// a buffer of its own.
    fn encode(&self, frame: &v1::Frame) -> Option<Bytes> {
        let len = FRAME_PREFIX_BYTES + prost::Message::encoded_len(frame);
        if len > ANSWER_BUFFER_BYTES / 4 {
            let mut bytes = BytesMut::new();
            encode_message(frame, self.frame_bytes_max, &mut bytes).ok()?;
            return Some(bytes.freeze());
        }
        let mut buffer = self
            .answer_buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buffer.capacity() - buffer.len() < len {
            // The old chunk lives on in the frames cut from it until they are written.
            *buffer = BytesMut::with_capacity(ANSWER_BUFFER_BYTES);
        }
        debug_assert!(buffer.is_empty(), "every encoded frame is split off");
        encode_message(frame, self.frame_bytes_max, &mut buffer).ok()?;
        debug_assert_eq!(buffer.len(), len, "encoded_len disagrees with encode");
        Some(buffer.split().freeze())
    }

    /// Encodes a response as (frame, tail): a media download's bytes go in the tail,
    /// written from their own buffer (a mapped file) instead of copied into the frame.
    fn encode_response(&self, request_id: u64, kind: response::Kind) -> Option<(Bytes, Bytes)> {
        if let response::Kind::MediaDownload(answer) = &kind {
            return chatlog_wire::frame::split::media_download(
                request_id,
                answer,
                self.frame_bytes_max,
            )
            .ok();
        }
        Some((
            self.encode(&v1::Frame::response(request_id, kind))?,
            Bytes::new(),
        ))
    }

    /// Registers a new request; an error is its immediate answer or a reason to close.
    fn begin_request(&self, request_id: u64) -> Result<(), BeginError> {
        let mut state = self.state();
        if state.requests.contains_key(&request_id) {
            return Err(BeginError::Duplicate);
        }
        if state.requests.len() >= self.requests_in_flight_max {
            return Err(BeginError::Full);
        }
        state
            .requests
            .insert(request_id, InFlight::Running { held: Vec::new() });
        Ok(())
    }

    /// Queues the response of a request begun with [`Outbox::begin_request`], and the
    /// pushes held for it.
    fn respond(
        &self,
        request_id: u64,
        result: Result<response::Kind, v1::Error>,
        unsubscribes: Option<u64>,
    ) {
        let (frame, after) = match result {
            Ok(kind) => {
                let after = match (&kind, unsubscribes) {
                    (response::Kind::Subscribe(_), _) => AfterResponse::Subscribed,
                    (response::Kind::Unsubscribe(_), Some(id)) => AfterResponse::Unsubscribed(id),
                    _ => AfterResponse::Done,
                };
                match self.encode_response(request_id, kind) {
                    Some(frame) => (frame, after),
                    None => (
                        (
                            self.error_frame(
                                request_id,
                                v1::Error::new(
                                    ErrorCode::Internal,
                                    "the response is over the frame limit",
                                ),
                            ),
                            Bytes::new(),
                        ),
                        AfterResponse::Done,
                    ),
                }
            }
            Err(error) => (
                (self.error_frame(request_id, error), Bytes::new()),
                AfterResponse::Done,
            ),
        };
        let (frame, tail) = frame;
        let mut state = self.state();
        if state.closed {
            return;
        }
        let held = match state.requests.get_mut(&request_id) {
            Some(entry @ InFlight::Running { .. }) => {
                match std::mem::replace(entry, InFlight::Answered) {
                    InFlight::Running { held } => held,
                    _ => unreachable!("matched Running above"),
                }
            }
            other => {
                debug_assert!(false, "request {request_id} answered twice: {other:?}");
                return;
            }
        };
        self.enqueue(Outgoing::Response {
            request_id,
            frame,
            tail,
            after,
        });
        if after == AfterResponse::Subscribed {
            for (frame, ends_subscription) in held {
                self.enqueue(Outgoing::Push {
                    frame,
                    ends_subscription,
                });
            }
        } else {
            // The subscription never started: its early pushes mean nothing.
            state.pushes_queued -= held.len();
            state.push_bytes_queued -= held.iter().map(|(f, _)| f.len()).sum::<usize>();
            drop(state);
            self.room.notify_waiters();
        }
    }

    fn error_frame(&self, request_id: u64, error: v1::Error) -> Bytes {
        let frame = v1::Frame::response(request_id, response::Kind::Error(error));
        self.encode(&frame).unwrap_or_else(|| {
            self.encode(&v1::Frame::response(
                request_id,
                response::Kind::Error(v1::Error::new(ErrorCode::Internal, "error too large")),
            ))
            .expect("a short error fits in any frame")
        })
    }

    fn push(&self, request_id: u64, kind: push::Kind) -> Result<(), PushError> {
        let ends_subscription =
            matches!(kind, push::Kind::SubscriptionEnded(_)).then_some(request_id);
        let frame = self
            .encode(&v1::Frame::push(request_id, kind))
            .ok_or(PushError::TooLarge)?;
        self.push_frame(request_id, frame, ends_subscription)
    }

    /// Queues an encoded push frame; see [`Outbox::push`].
    fn push_frame(
        &self,
        request_id: u64,
        frame: Bytes,
        ends_subscription: Option<u64>,
    ) -> Result<(), PushError> {
        if frame.len() > FRAME_PREFIX_BYTES + self.frame_bytes_max as usize {
            return Err(PushError::TooLarge);
        }
        let mut state = self.state();
        if state.closed {
            return Err(PushError::Closed);
        }
        let over_bytes = state.pushes_queued > 0
            && state.push_bytes_queued + frame.len() > self.push_queue_bytes_max;
        if state.pushes_queued >= self.push_queue_len_max || over_bytes {
            drop(state);
            self.close(Close::Disconnect(v1::Error::new(
                ErrorCode::RateLimited,
                "the connection reads too slowly",
            )));
            return Err(PushError::SlowReader);
        }
        state.pushes_queued += 1;
        state.push_bytes_queued += frame.len();
        if request_id != 0
            && let Some(InFlight::Running { held }) = state.requests.get_mut(&request_id)
        {
            held.push((frame, ends_subscription));
            return Ok(());
        }
        self.enqueue(Outgoing::Push {
            frame,
            ends_subscription,
        });
        Ok(())
    }

    /// Bookkeeping once the writer has taken `outgoing` off the queue.
    fn taken(&self, outgoing: &Outgoing) {
        match outgoing {
            Outgoing::Response {
                request_id, after, ..
            } => {
                let mut state = self.state();
                match after {
                    AfterResponse::Done => {
                        state.requests.remove(request_id);
                    }
                    AfterResponse::Subscribed => {
                        state.requests.insert(*request_id, InFlight::Subscribed);
                    }
                    AfterResponse::Unsubscribed(subscription) => {
                        state.requests.remove(request_id);
                        if let Some(InFlight::Subscribed) = state.requests.get(subscription) {
                            state.requests.remove(subscription);
                        }
                    }
                }
            }
            Outgoing::Push { .. } => {
                let mut pushes = TakenPushes::default();
                pushes.add(outgoing);
                self.taken_pushes(&mut pushes);
            }
            Outgoing::Immediate { .. } => {}
        }
    }

    /// Bookkeeping for the pushes of one write batch at once: one lock and one wake of
    /// [`PushSender::room`] waiters per batch instead of per push (a fan-out of a busy
    /// chat queues many pushes per connection, and the writer takes them together).
    ///
    /// The answered requests of the batch (`AfterResponse::Done`) leave the in-flight
    /// table here too, under the same lock, instead of one lock per response.
    fn taken_pushes(&self, pushes: &mut TakenPushes) {
        if pushes.count == 0 && pushes.answered.is_empty() {
            return;
        }
        let mut state = self.state();
        for request_id in pushes.answered.drain(..) {
            state.requests.remove(&request_id);
        }
        if pushes.count == 0 {
            return;
        }
        state.pushes_queued -= pushes.count;
        state.push_bytes_queued -= pushes.bytes;
        for subscription in pushes.ended.drain(..) {
            if let Some(InFlight::Subscribed) = state.requests.get(&subscription) {
                state.requests.remove(&subscription);
            }
        }
        drop(state);
        pushes.count = 0;
        pushes.bytes = 0;
        self.room.notify_waiters();
    }
}

/// Pushes and final responses the writer has taken off the queue and not yet accounted
/// for in the outbox's state ([`Outbox::taken_pushes`]).
#[derive(Debug, Default)]
struct TakenPushes {
    count: usize,
    bytes: usize,
    /// Subscriptions whose `SubscriptionEnded` push was taken.
    ended: Vec<u64>,
    /// Requests whose final response was taken (`AfterResponse::Done`). At most one
    /// write batch's worth ([`WRITE_BATCH_FRAMES_MAX`]); the vector is reused.
    answered: Vec<u64>,
}

impl TakenPushes {
    fn add(&mut self, outgoing: &Outgoing) {
        if let Outgoing::Push {
            frame,
            ends_subscription,
        } = outgoing
        {
            self.count += 1;
            self.bytes += frame.len();
            self.ended.extend(*ends_subscription);
        }
    }
}

enum BeginError {
    /// The id is in flight already: a protocol violation.
    Duplicate,
    /// The in-flight limit is reached.
    Full,
}

/// Tells a connection over the limit why it is refused, then closes it.
pub(super) async fn refuse(mut stream: TcpStream, write_timeout: Duration) {
    configure(&stream);
    let reason = v1::Error {
        code: ErrorCode::Unavailable.into(),
        message: "too many connections".into(),
        retry_after_ms: REFUSED_RETRY_AFTER_MS,
    };
    let mut bytes = BytesMut::new();
    encode_message(
        &disconnect_frame(reason),
        chatlog_wire::limits::FRAME_BYTES_MAX,
        &mut bytes,
    )
    .expect("a disconnect fits in a frame");
    if timeout(write_timeout, stream.write_all(&bytes))
        .await
        .is_ok()
    {
        let (mut read_half, mut write_half) = stream.into_split();
        let _ = write_half.shutdown().await;
        linger(&mut read_half).await;
    }
}

fn disconnect_frame(reason: v1::Error) -> v1::Frame {
    v1::Frame::push(
        0,
        push::Kind::Disconnect(v1::Disconnect {
            reason: Some(reason),
        }),
    )
}

/// After the last frame was sent and the write side shut: reads and discards until the
/// peer closes (bounded in time and bytes), so that the peer reads our last frame instead
/// of a reset caused by its unread bytes.
async fn linger(read_half: &mut OwnedReadHalf) {
    let deadline = Instant::now() + LINGER_TIMEOUT;
    let mut discarded = 0;
    let mut buf = [0u8; 4096];
    while discarded < LINGER_BYTES_MAX {
        match tokio::time::timeout_at(deadline, read_half.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(read)) => discarded += read,
        }
    }
}

/// Why a connection's read loop ends.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// The outbox closed (its reason is set already).
    Closed,
    /// The gateway is shutting down: the connection is told so.
    ShuttingDown,
}

impl Stop {
    fn close(self, outbox: &Outbox) {
        if let Stop::ShuttingDown = self {
            outbox.close(Close::Disconnect(v1::Error {
                code: ErrorCode::Unavailable.into(),
                message: "the server is shutting down".into(),
                retry_after_ms: REFUSED_RETRY_AFTER_MS,
            }));
        }
    }
}

/// Completes when the gateway shuts down.
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    // An error means the gateway is gone, which is a shutdown too.
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

fn error_kind(code: ErrorCode, message: &str) -> response::Kind {
    response::Kind::Error(v1::Error::new(code, message))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Serves one accepted connection until it closes.
pub(super) async fn run<S: Service>(
    id: u64,
    stream: TcpStream,
    peer_addr: SocketAddr,
    service: Arc<S>,
    limits: Arc<GatewayLimits>,
    mut shutdown: watch::Receiver<bool>,
) {
    configure(&stream);
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = FrameReader::new(read_half, limits.frame_bytes_max);

    let principal = tokio::select! {
        result = handshake(&mut reader, &mut write_half, &*service, &limits) => result,
        () = shutting_down(&mut shutdown) => Err(Some(v1::Error {
            code: ErrorCode::Unavailable.into(),
            message: "the server is shutting down".into(),
            retry_after_ms: REFUSED_RETRY_AFTER_MS,
        })),
    };
    let (principal, live_pushes) = match principal {
        Ok(accepted) => accepted,
        Err(reason) => {
            if let Some(reason) = reason {
                let _ = write_frame(&mut write_half, &disconnect_frame(reason), &limits).await;
            }
            let _ = write_half.shutdown().await;
            linger(reader.get_mut()).await;
            return;
        }
    };

    let queue_len = limits.requests_in_flight_max as usize
        + IMMEDIATE_RESPONSES_MAX
        + limits.push_queue_len_max;
    let (queue, queued) = mpsc::channel(queue_len);
    let (close_sender, close_receiver) = watch::channel(None);
    let outbox = Arc::new(Outbox {
        queue,
        state: Mutex::new(OutboxState::default()),
        immediate_slots: Arc::new(Semaphore::new(IMMEDIATE_RESPONSES_MAX)),
        close: close_sender,
        requests_in_flight_max: limits.requests_in_flight_max as usize,
        push_queue_len_max: limits.push_queue_len_max,
        push_queue_bytes_max: limits.push_queue_bytes_max,
        room: tokio::sync::Notify::new(),
        frame_bytes_max: limits.frame_bytes_max,
        // Empty: a connection allocates its first chunk when it first answers.
        answer_buffer: Mutex::new(BytesMut::new()),
    });
    let ctx = Arc::new(ConnCtx {
        id,
        peer_addr,
        principal: Mutex::new(principal),
        live_pushes,
        pushes: PushSender {
            outbox: Arc::clone(&outbox),
        },
    });
    tracing::debug!(connection = id, %peer_addr, "connection open");
    service.connection_opened(&ctx);

    let writer = tokio::spawn(write_loop(
        write_half,
        queued,
        Arc::clone(&outbox),
        close_receiver.clone(),
        limits.write_timeout,
    ));
    let mut handlers = JoinSet::new();
    let mut handler_requests = HashMap::new();
    // Requests the service asked to run inline ([`Service::runs_inline`]), polled by this
    // task; at most the in-flight limit of them (the outbox's table bounds them anyway).
    let inline_max = limits.requests_in_flight_max as usize;
    let mut inline = FuturesUnordered::new();
    let mut close_receiver = close_receiver;
    // Why the loop ends: the outbox closing or the gateway shutting down. One future for
    // the connection's life, polled by every pass of the loop: made anew per pass (as it
    // was), each of the two watch waits registered and removed a waiter, a lock each, for
    // every frame read and every answer. It completes once, and the loop then ends.
    let stopping = async {
        tokio::select! {
            biased;
            _ = close_receiver.changed() => Stop::Closed,
            () = shutting_down(&mut shutdown) => Stop::ShuttingDown,
        }
    };
    tokio::pin!(stopping);
    let mut idle_deadline = Instant::now() + limits.idle_timeout;
    // One timer for the idle timeout, kept across iterations and moved only when it
    // fires early: a `sleep_until` made per iteration would enter and leave the timer
    // wheel for every frame read and every answer.
    let idle = tokio::time::sleep_until(idle_deadline);
    tokio::pin!(idle);

    loop {
        tokio::select! {
            biased;
            stop = &mut stopping => {
                stop.close(&outbox);
                break;
            }
            Some(answered) = inline.next(), if !inline.is_empty() => {
                if let Err(request_id) = answered {
                    tracing::error!(connection = id, request_id, "request handler panicked");
                    outbox.respond(
                        request_id,
                        Err(v1::Error::new(ErrorCode::Internal, "the request failed unexpectedly")),
                        None,
                    );
                }
            }
            Some(joined) = handlers.join_next_with_id(), if !handlers.is_empty() => {
                let (task_id, panicked) = match joined {
                    Ok((task_id, ())) => (task_id, false),
                    Err(error) => (error.id(), error.is_panic()),
                };
                let request_id = handler_requests.remove(&task_id);
                if panicked && let Some(request_id) = request_id {
                    tracing::error!(connection = id, request_id, "request handler panicked");
                    outbox.respond(
                        request_id,
                        Err(v1::Error::new(ErrorCode::Internal, "the request failed unexpectedly")),
                        None,
                    );
                }
            }
            () = &mut idle => {
                if Instant::now() < idle_deadline {
                    // A frame arrived since the timer was set: wait for the rest.
                    idle.as_mut().reset(idle_deadline);
                    continue;
                }
                outbox.close(Close::Disconnect(v1::Error::new(
                    ErrorCode::Timeout,
                    "the connection was idle too long",
                )));
                break;
            }
            next = reader.next_frame() => {
                let payload = match next {
                    Ok(Some(payload)) => payload,
                    Ok(None) => {
                        outbox.close(Close::Silent);
                        break;
                    }
                    Err(error @ chatlog_wire::Error::Io { .. }) => {
                        tracing::debug!(connection = id, %error, "read failed");
                        outbox.close(Close::Silent);
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(connection = id, %error, "bad framing");
                        outbox.close(Close::Disconnect(v1::Error::new(
                            error.protocol_code(),
                            error.to_string(),
                        )));
                        break;
                    }
                };
                idle_deadline = Instant::now() + limits.idle_timeout;
                let frame: v1::Frame = match decode_message(payload) {
                    Ok(frame) => frame,
                    Err(error) => {
                        outbox.close(Close::Disconnect(v1::Error::new(
                            ErrorCode::BadRequest,
                            error.to_string(),
                        )));
                        break;
                    }
                };
                let request_id = frame.request_id;
                let kind = match frame.body {
                    Some(frame::Body::Request(request)) => request.kind,
                    _ => {
                        outbox.close(Close::Disconnect(v1::Error::new(
                            ErrorCode::BadRequest,
                            "clients send only requests",
                        )));
                        break;
                    }
                };
                let immediate = match (request_id, kind) {
                    (0, _) => error_kind(ErrorCode::BadRequest, "request id 0"),
                    (_, None) => error_kind(
                        ErrorCode::UnknownRequest,
                        "a request kind this server does not know",
                    ),
                    (_, Some(request::Kind::Handshake(_))) => {
                        error_kind(ErrorCode::BadRequest, "the handshake was done already")
                    }
                    (_, Some(request::Kind::Ping(ping))) => response::Kind::Ping(v1::PingResponse {
                        nonce: ping.nonce,
                        server_time_ms: now_ms(),
                    }),
                    (_, Some(kind)) => match outbox.begin_request(request_id) {
                        Err(BeginError::Duplicate) => {
                            outbox.close(Close::Disconnect(v1::Error::new(
                                ErrorCode::BadRequest,
                                format!("request id {request_id} is already in flight"),
                            )));
                            break;
                        }
                        Err(BeginError::Full) => response::Kind::Error(v1::Error {
                            code: ErrorCode::RateLimited.into(),
                            message: "too many requests in flight".into(),
                            retry_after_ms: IN_FLIGHT_RETRY_AFTER_MS,
                        }),
                        Ok(()) => {
                            let unsubscribes = match &kind {
                                request::Kind::Unsubscribe(unsubscribe) => {
                                    Some(unsubscribe.subscription_id)
                                }
                                _ => None,
                            };
                            // Every log line on the request's path on this node carries
                            // the connection and request ids (the span's fields).
                            let span = tracing::info_span!(
                                "request",
                                connection = id,
                                request = request_id
                            );
                            if inline.len() < inline_max && service.runs_inline(&kind) {
                                // Polled by this task: no task spawned, no wake of
                                // another task when its proposal completes. Boxed once,
                                // here: the request's future (the post, its proposal)
                                // is a few KiB, and unboxed it was copied into each
                                // wrapper below and into `FuturesUnordered`'s task (a
                                // `memmove` of it per post, and an allocation too large
                                // for the allocator's per-thread cache); now they move
                                // a pointer, and the task is small.
                                let answering = Box::pin(answer(
                                    &outbox,
                                    request_id,
                                    unsubscribes,
                                    service.handle_inline(&ctx, request_id, kind),
                                ));
                                inline.push(
                                    async move {
                                        AssertUnwindSafe(answering)
                                            .catch_unwind()
                                            .await
                                            .map_err(|_| request_id)
                                    }
                                    .instrument(span),
                                );
                                continue;
                            }
                            let service = Arc::clone(&service);
                            let ctx = Arc::clone(&ctx);
                            let outbox = Arc::clone(&outbox);
                            let task = handlers.spawn(
                                async move {
                                    let handling = service.handle(&ctx, request_id, kind);
                                    answer(&outbox, request_id, unsubscribes, handling).await;
                                }
                                .instrument(span),
                            );
                            handler_requests.insert(task.id(), request_id);
                            continue;
                        }
                    },
                };
                // An answer of the gateway's own: wait for a slot (not reading meanwhile)
                // unless the connection closes first.
                let slot = tokio::select! {
                    slot = Arc::clone(&outbox.immediate_slots).acquire_owned() => {
                        slot.expect("the immediate semaphore is never closed")
                    }
                    stop = &mut stopping => {
                        stop.close(&outbox);
                        break;
                    }
                };
                let frame = v1::Frame::response(request_id, immediate);
                let frame = outbox.encode(&frame).expect("the gateway's answers are small");
                outbox.enqueue(Outgoing::Immediate { frame, _slot: slot });
            }
        }
    }

    // Handlers still running are cancelled; their answers would not be sent anyway.
    drop(inline);
    handlers.shutdown().await;
    outbox.close(Close::Silent);
    let _ = writer.await;
    linger(reader.get_mut()).await;
    service.connection_closed(&ctx);
    tracing::debug!(connection = id, "connection closed");
}

/// Answers one request begun with [`Outbox::begin_request`]: awaits the service's
/// answer (`Service::handle`, or `Service::handle_inline` for a request polled on its
/// connection's task), logs the outcome (inside the request's span) and queues the
/// response.
async fn answer(
    outbox: &Outbox,
    request_id: u64,
    unsubscribes: Option<u64>,
    handling: impl Future<Output = Result<response::Kind, v1::Error>>,
) {
    // The clock is read only when the answer is logged (two reads per request
    // otherwise, for nothing).
    let started = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
    let result = handling.await;
    if let Some(started) = started {
        log_answer(started, &result);
    }
    outbox.respond(request_id, result, unsubscribes);
}

fn log_answer(started: Instant, result: &Result<response::Kind, v1::Error>) {
    match result {
        Err(e) => tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            code = e.code,
            "request refused: {}",
            e.message
        ),
        Ok(_) => tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "request answered"
        ),
    }
}

/// Reads and answers the handshake. `Ok` is the authenticated principal, if any, and
/// whether the client wants live pushes (`Handshake::no_live_pushes` unset); `Err` means
/// close, after sending the `Disconnect` reason when there is one (the error responses
/// are written here).
async fn handshake<S: Service>(
    reader: &mut FrameReader<OwnedReadHalf>,
    write_half: &mut OwnedWriteHalf,
    service: &S,
    limits: &GatewayLimits,
) -> Result<(Option<Principal>, bool), Option<v1::Error>> {
    let payload = match timeout(limits.handshake_timeout, reader.next_frame()).await {
        Err(_) => {
            return Err(Some(v1::Error::new(
                ErrorCode::Timeout,
                "no handshake in time",
            )));
        }
        Ok(Ok(Some(payload))) => payload,
        Ok(Ok(None)) | Ok(Err(chatlog_wire::Error::Io { .. })) => return Err(None),
        Ok(Err(error)) => {
            return Err(Some(v1::Error::new(
                error.protocol_code(),
                error.to_string(),
            )));
        }
    };
    let frame: v1::Frame = decode_message(payload)
        .map_err(|error| Some(v1::Error::new(ErrorCode::BadRequest, error.to_string())))?;
    let request_id = frame.request_id;
    let Some(frame::Body::Request(v1::Request {
        kind: Some(request::Kind::Handshake(handshake)),
    })) = frame.body
    else {
        return Err(Some(v1::Error::new(
            ErrorCode::BadRequest,
            "the first request must be a handshake",
        )));
    };

    let refuse = async |error: v1::Error,
                        write_half: &mut OwnedWriteHalf|
           -> Result<(Option<Principal>, bool), Option<v1::Error>> {
        let frame = v1::Frame::response(request_id, response::Kind::Error(error));
        let _ = write_frame(write_half, &frame, limits).await;
        // Answered already: close without a Disconnect.
        Err(None)
    };
    let lowest = PROTOCOL_VERSIONS[0];
    if handshake.protocol_version < lowest {
        return refuse(
            v1::Error::new(
                ErrorCode::UnsupportedVersion,
                format!("this server speaks protocol versions {PROTOCOL_VERSIONS:?}"),
            ),
            write_half,
        )
        .await;
    }
    if handshake.client_name.len() > CLIENT_NAME_BYTES_MAX as usize {
        return refuse(
            v1::Error::new(
                ErrorCode::TooLarge,
                format!("client_name is over {CLIENT_NAME_BYTES_MAX} bytes"),
            ),
            write_half,
        )
        .await;
    }
    let version = *PROTOCOL_VERSIONS
        .iter()
        .rev()
        .find(|version| **version <= handshake.protocol_version)
        .expect("at least the lowest version is spoken");
    let token = (!handshake.session_token.is_empty()).then_some(handshake.session_token.as_str());
    let principal = match service.authenticate(token).await {
        Ok(principal) => principal,
        Err(error) => return refuse(error, write_half).await,
    };
    let ok = v1::HandshakeOk {
        protocol_version: version,
        server_name: SERVER_NAME.into(),
        node_id: service.node_id(),
        user_id: principal.as_ref().map_or(0, |principal| principal.user_id),
        session_id: principal
            .as_ref()
            .map_or(0, |principal| principal.session_id),
        limits: Some(limits.to_proto()),
    };
    let frame = v1::Frame::response(request_id, response::Kind::HandshakeOk(ok));
    write_frame(write_half, &frame, limits)
        .await
        .map_err(|()| None)?;
    Ok((principal, !handshake.no_live_pushes))
}

/// Writes one frame directly (before the writer task exists), within the write timeout.
async fn write_frame(
    write_half: &mut OwnedWriteHalf,
    frame: &v1::Frame,
    limits: &GatewayLimits,
) -> Result<(), ()> {
    let mut bytes = BytesMut::new();
    encode_message(frame, limits.frame_bytes_max, &mut bytes).map_err(|_| ())?;
    match timeout(limits.write_timeout, write_half.write_all(&bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// The writer task: takes queued frames, coalesces them into one `write`, and on close
/// writes the queued responses and the `Disconnect`.
async fn write_loop(
    mut write_half: OwnedWriteHalf,
    mut queued: mpsc::Receiver<Outgoing>,
    outbox: Arc<Outbox>,
    mut close: watch::Receiver<Option<Close>>,
    write_timeout: Duration,
) {
    // The frames of one write, by reference: no copy, and an idle connection holds no
    // buffer (a node may hold tens of thousands, such as a channel's subscribers).
    let mut batch = Batch::default();
    let mut pushes = TakenPushes::default();
    // False once a write was cut short: the stream is then mid-frame and nothing more
    // may be written.
    let mut in_step = true;
    // One wait for the close for the writer's life (not one made per batch, twice: each
    // registered and removed a waiter on the watch, a lock each). It completes once, and
    // the loop then ends.
    let closing = close.clone();
    let closing = async move {
        let mut closing = closing;
        let _ = closing.changed().await;
    };
    tokio::pin!(closing);
    loop {
        let first = tokio::select! {
            biased;
            () = &mut closing => break,
            first = queued.recv() => first,
        };
        let Some(first) = first else { break };
        take_into(&outbox, first, &mut batch, &mut pushes);
        // Let the tasks that are ready now run before writing: the frame that woke this
        // task is usually the first of a burst (the answers to one storage commit arrive
        // together, and tokio runs a woken task next), so one yield turns a `writev` per
        // frame into one per burst. Alone, it costs one pass of the scheduler.
        if batch.frames.len() == 1 && !batch.is_full() {
            tokio::task::yield_now().await;
        }
        while !batch.is_full() {
            match queued.try_recv() {
                Ok(outgoing) => take_into(&outbox, outgoing, &mut batch, &mut pushes),
                Err(_) => break,
            }
        }
        outbox.taken_pushes(&mut pushes);
        let written = tokio::select! {
            biased;
            () = &mut closing => None,
            written = timeout(write_timeout, batch.write_to(&mut write_half)) => Some(written),
        };
        match written {
            Some(Ok(Ok(()))) => batch.clear(),
            Some(_) => {
                // Failed, or no progress for the write timeout: the peer is gone or does
                // not read.
                outbox.close(Close::Silent);
                in_step = false;
                break;
            }
            None => {
                in_step = false;
                break;
            }
        }
    }

    let reason = close.borrow_and_update().clone();
    if in_step && let Some(Close::Disconnect(reason)) = reason {
        // Responses already queued go out first; pushes are dropped (a slow reader is
        // being cut off, and subscriptions end with the connection anyway).
        batch.clear();
        while !batch.is_full() {
            match queued.try_recv() {
                Ok(outgoing @ (Outgoing::Response { .. } | Outgoing::Immediate { .. })) => {
                    take_into(&outbox, outgoing, &mut batch, &mut pushes)
                }
                Ok(Outgoing::Push { .. }) => {}
                Err(_) => break,
            }
        }
        let mut disconnect = BytesMut::new();
        encode_message(
            &disconnect_frame(reason),
            outbox.frame_bytes_max,
            &mut disconnect,
        )
        .expect("a disconnect fits in a frame");
        batch.push(disconnect.freeze());
        let _ = timeout(LINGER_TIMEOUT, batch.write_to(&mut write_half)).await;
    }
    let _ = timeout(LINGER_TIMEOUT, write_half.shutdown()).await;
}

/// Appends a queued frame to the write batch; its bookkeeping is done at once, or for a
/// push gathered in `pushes` for [`Outbox::taken_pushes`].
fn take_into(outbox: &Outbox, outgoing: Outgoing, batch: &mut Batch, pushes: &mut TakenPushes) {
    match &outgoing {
        Outgoing::Push { .. } => pushes.add(&outgoing),
        Outgoing::Response {
            request_id,
            after: AfterResponse::Done,
            ..
        } => pushes.answered.push(*request_id),
        _ => outbox.taken(&outgoing),
    }
    let (frame, tail) = match outgoing {
        Outgoing::Response { frame, tail, .. } => (frame, tail),
        Outgoing::Push { frame, .. } | Outgoing::Immediate { frame, .. } => (frame, Bytes::new()),
    };
    batch.push(frame);
    if !tail.is_empty() {
        batch.push(tail);
    }
}

/// The frames of one write: at most [`WRITE_BATCH_FRAMES_MAX`] frames and about
/// [`WRITE_BATCH_BYTES_MAX`] bytes (the last frame may pass it), written with `writev`
/// straight from their buffers.
#[derive(Debug, Default)]
struct Batch {
    frames: std::collections::VecDeque<Bytes>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    fn is_full(&self) -> bool {
        self.frames.len() >= WRITE_BATCH_FRAMES_MAX || self.bytes >= WRITE_BATCH_BYTES_MAX
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }

    /// Writes every frame (a short write continues where it stopped); the batch is empty
    /// after success. On an error the stream may be mid-frame.
    async fn write_to(&mut self, w: &mut OwnedWriteHalf) -> std::io::Result<()> {
        use bytes::Buf;
        while !self.frames.is_empty() {
            let written = {
                let mut slices = [std::io::IoSlice::new(&[]); WRITE_BATCH_FRAMES_MAX];
                let mut n = 0;
                for (slice, frame) in slices.iter_mut().zip(self.frames.iter()) {
                    *slice = std::io::IoSlice::new(frame);
                    n += 1;
                }
                w.write_vectored(&slices[..n]).await?
            };
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.bytes -= written;
            let mut left = written;
            while left > 0 {
                let front = self
                    .frames
                    .front_mut()
                    .expect("written bytes came from frames");
                if left >= front.len() {
                    left -= front.len();
                    self.frames.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames cut from the answer buffer are byte for byte what encoding each alone
    /// gives, whatever their sizes and however many chunks they take, and frames still
    /// held keep their bytes after the buffer moved on to new chunks.
    #[test]
    fn answers_cut_from_the_shared_buffer_are_each_frame_exactly() {
        let (queue, _queued) = mpsc::channel(1);
        let (close, _) = watch::channel(None);
        let outbox = Outbox {
            queue,
            state: Mutex::new(OutboxState::default()),
            immediate_slots: Arc::new(Semaphore::new(1)),
            close,
            requests_in_flight_max: 1,
            push_queue_len_max: 1,
            push_queue_bytes_max: 1,
            room: tokio::sync::Notify::new(),
            frame_bytes_max: chatlog_wire::limits::FRAME_BYTES_MAX,
            answer_buffer: Mutex::new(BytesMut::new()),
        };
        let mut held = Vec::new();
        for i in 0..2_000u64 {
            // From a few bytes to past the buffer's small-frame bound.
            let message = "m".repeat(((i * 7919) % (ANSWER_BUFFER_BYTES as u64 / 3)) as usize);
            let frame = v1::Frame::response(
                i + 1,
                response::Kind::Error(v1::Error::new(ErrorCode::BadRequest, message)),
            );
            let mut alone = BytesMut::new();
            encode_message(&frame, outbox.frame_bytes_max, &mut alone).unwrap();
            let cut = outbox.encode(&frame).unwrap();
            assert_eq!(cut, alone.freeze(), "frame {i}");
            held.push((cut, frame));
        }
        for (bytes, frame) in held {
            let payload = bytes.slice(FRAME_PREFIX_BYTES..);
            assert_eq!(decode_message::<v1::Frame>(payload).unwrap(), frame);
        }
    }

    /// A batch larger than the socket takes at once (the reader starts late), of frames
    /// of many sizes: every byte arrives once, in order, across short writes.
    #[tokio::test]
    async fn a_batch_is_written_whole_across_short_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let mut peer = client.await.unwrap();
        let (_read, mut write_half) = server.into_split();
        let mut expected = Vec::new();
        let mut batch = Batch::default();
        // 3 × 64 frames of 1 to 40,000 bytes: several MiB, more than loopback buffers.
        let mut writes = Vec::new();
        for round in 0..3u32 {
            for i in 0..WRITE_BATCH_FRAMES_MAX as u32 {
                let len = 1 + ((i * 7919 + round * 104_729) % 40_000) as usize;
                let frame: Vec<u8> = (0..len).map(|b| (b as u32 ^ i ^ round) as u8).collect();
                expected.extend_from_slice(&frame);
                writes.push(Bytes::from(frame));
            }
        }
        let total = expected.len();
        let reader = tokio::spawn(async move {
            // Start late, so the writer meets a full socket buffer.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut got = vec![0u8; total];
            peer.read_exact(&mut got).await.unwrap();
            got
        });
        for chunk in writes.chunks(WRITE_BATCH_FRAMES_MAX) {
            for frame in chunk {
                batch.push(frame.clone());
            }
            assert!(batch.is_full());
            batch.write_to(&mut write_half).await.unwrap();
            assert_eq!(batch.bytes, 0);
            assert!(batch.frames.is_empty());
        }
        assert_eq!(reader.await.unwrap(), expected);
    }
}
