//! The gateway's connection layer over real sockets on 127.0.0.1, with the real
//! `chatlog_wire::Client` and, where a test must misbehave, raw frames.
//!
//! The service here is a fixture for the connection layer (the Raft-backed service comes
//! later): an in-memory counter that de-duplicates sends by client message id, plus a few
//! request kinds repurposed to steer the tests (gates, floods, a dropped connection).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use chatlog::gateway::{self, ConnCtx, GatewayLimits, Principal, PushError, Service};
use chatlog_wire::client::{Client, ClientError, ClientOptions, PushItem, ReconnectPolicy};
use chatlog_wire::frame::{FrameReader, encode_message, encode_payload};
use chatlog_wire::proto::v1::{self, ErrorCode, frame, push, request, response};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

/// Limit on every wait in these tests, so a bug fails a test instead of hanging it.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The fixture service.
///
/// - `login` authenticates the connection as `user_id`; its token is `tok-<user_id>`.
/// - `send_message` needs a session; it appends to the chat and de-duplicates by
///   (chat, client message id). With `drop_next_send` set, it commits the next send and
///   then closes the connection before answering.
/// - `history { chat_id: k }` waits until `mark_read { chat_id: k }` opens gate k, then
///   answers with `head_seq` = k (its head for real chats otherwise).
/// - `subscribe { chat_id, from_seq: n }` pushes n events *before* returning.
/// - `get_unread_counts` floods the connection with 60 KiB pushes until a push fails.
/// - `create_chat` blocks forever (a request in flight that is not repeatable).
#[derive(Default)]
struct Fixture {
    heads: Mutex<HashMap<u64, u64>>,
    sent: Mutex<HashMap<(u64, u64), v1::SendMessageResponse>>,
    gates: Mutex<HashMap<u64, Arc<Notify>>>,
    /// How many `history` requests wait at their gate.
    waiting: watch::Sender<usize>,
    /// How many `create_chat` requests block.
    blocked: watch::Sender<usize>,
    drop_next_send: AtomicBool,
    handshakes: AtomicU64,
    flood_result: Mutex<Option<oneshot::Sender<(usize, PushError)>>>,
}

impl Fixture {
    fn gate(&self, key: u64) -> Arc<Notify> {
        Arc::clone(self.gates.lock().unwrap().entry(key).or_default())
    }
}

fn error(code: ErrorCode, message: &str) -> v1::Error {
    v1::Error::new(code, message)
}

impl Service for Fixture {
    async fn authenticate(&self, token: Option<&str>) -> Result<Option<Principal>, v1::Error> {
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        let Some(token) = token else { return Ok(None) };
        let user_id = token
            .strip_prefix("tok-")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| error(ErrorCode::Unauthenticated, "unknown token"))?;
        Ok(Some(Principal {
            user_id,
            session_id: user_id,
            device_id: "".into(),
        }))
    }

    async fn handle(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: request::Kind,
    ) -> Result<response::Kind, v1::Error> {
        match request {
            request::Kind::Login(login) => {
                conn.set_principal(Some(Principal {
                    user_id: login.user_id,
                    session_id: login.user_id,
                    device_id: login.device_id.as_str().into(),
                }));
                Ok(response::Kind::Login(v1::LoginResponse {
                    user_id: login.user_id,
                    session_id: login.user_id,
                    session_token: format!("tok-{}", login.user_id),
                }))
            }
            request::Kind::SendMessage(send) => {
                let Some(principal) = conn.principal() else {
                    return Err(error(ErrorCode::Unauthenticated, "log in first"));
                };
                let key = (send.chat_id, send.client_message_id);
                let committed = {
                    let mut sent = self.sent.lock().unwrap();
                    if let Some(original) = sent.get(&key) {
                        return Ok(response::Kind::SendMessage(v1::SendMessageResponse {
                            deduplicated: true,
                            ..*original
                        }));
                    }
                    let mut heads = self.heads.lock().unwrap();
                    let head = heads.entry(send.chat_id).or_default();
                    *head += 1;
                    let committed = v1::SendMessageResponse {
                        chat_id: send.chat_id,
                        seq: *head,
                        timestamp_ms: principal.user_id,
                        deduplicated: false,
                    };
                    sent.insert(key, committed);
                    committed
                };
                if self.drop_next_send.swap(false, Ordering::SeqCst) {
                    // Committed, but the answer is lost with the connection.
                    conn.disconnect(error(
                        ErrorCode::Unavailable,
                        "fixture drops the connection",
                    ));
                    std::future::pending::<()>().await;
                }
                Ok(response::Kind::SendMessage(committed))
            }
            request::Kind::History(history) => {
                let gate = self.gate(history.chat_id);
                self.waiting.send_modify(|waiting| *waiting += 1);
                gate.notified().await;
                Ok(response::Kind::History(v1::HistoryResponse {
                    events: Vec::new(),
                    head_seq: history.chat_id,
                    has_more: false,
                }))
            }
            request::Kind::MarkRead(mark) => {
                self.gate(mark.chat_id).notify_one();
                Ok(response::Kind::MarkRead(v1::MarkReadResponse {
                    chat_id: mark.chat_id,
                    read_seq: mark.seq,
                    unread_count: 0,
                }))
            }
            request::Kind::Subscribe(subscribe) => {
                for seq in 1..=subscribe.from_seq {
                    conn.pushes()
                        .push(request_id, chat_events(subscribe.chat_id, seq, ""))
                        .map_err(|_| error(ErrorCode::Internal, "push failed"))?;
                }
                Ok(response::Kind::Subscribe(v1::SubscribeResponse {
                    chat_id: subscribe.chat_id,
                    head_seq: subscribe.from_seq,
                }))
            }
            request::Kind::GetUnreadCounts(_) => {
                let text = "x".repeat(60 * 1024);
                let mut pushed = 0;
                let failure = loop {
                    match conn
                        .pushes()
                        .push(0, chat_events(1, pushed as u64 + 1, &text))
                    {
                        Ok(()) => pushed += 1,
                        Err(failure) => break failure,
                    }
                    // Let the writer run, as a real fan-out would between events.
                    tokio::task::yield_now().await;
                };
                if let Some(report) = self.flood_result.lock().unwrap().take() {
                    let _ = report.send((pushed, failure));
                }
                Err(error(ErrorCode::Internal, "flood ended"))
            }
            request::Kind::CreateChat(_) => {
                self.blocked.send_modify(|blocked| *blocked += 1);
                std::future::pending().await
            }
            _ => Err(error(ErrorCode::Internal, "not in the fixture")),
        }
    }
}

fn chat_events(chat_id: u64, seq: u64, text: &str) -> push::Kind {
    push::Kind::ChatEvents(v1::ChatEvents {
        events: vec![v1::Event {
            chat_id,
            seq,
            sender_id: 1,
            timestamp_ms: 0,
            body: Some(v1::event::Body::MessagePosted(v1::MessagePosted {
                client_message_id: seq,
                text: text.into(),
                ..Default::default()
            })),
        }],
    })
}

/// A gateway on 127.0.0.1 port 0, stopped when dropped.
struct Server {
    addr: String,
    fixture: Arc<Fixture>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(limits: GatewayLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fixture = Arc::new(Fixture::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway::serve(
            listener,
            Arc::clone(&fixture),
            limits,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            fixture,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self, options: ClientOptions) -> Client {
        Client::connect(&self.addr, options).await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn test_limits() -> GatewayLimits {
    GatewayLimits {
        idle_timeout: Duration::from_secs(30),
        ..GatewayLimits::default()
    }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, future)
        .await
        .expect("the test timed out")
}

/// A connection that speaks raw frames.
struct Raw {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read_half, writer) = stream.into_split();
        Raw {
            reader: FrameReader::new(read_half, chatlog_wire::limits::FRAME_BYTES_MAX),
            writer,
        }
    }

    /// Connects and completes a handshake.
    async fn handshaken(addr: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(v1::Frame::request(
            1,
            request::Kind::Handshake(v1::Handshake {
                protocol_version: 1,
                client_name: "raw".into(),
                session_token: String::new(),
                no_live_pushes: false,
            }),
        ))
        .await;
        let ok = raw.response(1).await;
        assert!(matches!(ok, response::Kind::HandshakeOk(_)), "{ok:?}");
        raw
    }

    async fn send(&mut self, frame: v1::Frame) {
        let mut bytes = BytesMut::new();
        encode_message(&frame, u32::MAX, &mut bytes).unwrap();
        self.writer.write_all(&bytes).await.unwrap();
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// The next frame; `None` at the end of the stream (or a reset).
    async fn next(&mut self) -> Option<v1::Frame> {
        within(self.reader.next_message()).await.ok().flatten()
    }

    async fn response(&mut self, request_id: u64) -> response::Kind {
        let frame = self.next().await.expect("a response");
        assert_eq!(frame.request_id, request_id);
        match frame.body {
            Some(frame::Body::Response(v1::Response { kind: Some(kind) })) => kind,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Expects a `Disconnect` with `code`, then the end of the stream.
    async fn expect_disconnect(&mut self, code: ErrorCode) {
        let frame = self.next().await.expect("a disconnect");
        match frame.body {
            Some(frame::Body::Push(v1::Push {
                kind: Some(push::Kind::Disconnect(disconnect)),
            })) => assert_eq!(disconnect.reason.unwrap().code(), code),
            other => panic!("expected a disconnect, got {other:?}"),
        }
        self.expect_closed().await;
    }

    async fn expect_closed(&mut self) {
        while let Some(frame) = self.next().await {
            assert!(
                !matches!(frame.body, Some(frame::Body::Response(_))),
                "unexpected {frame:?}"
            );
        }
    }
}

fn error_code(kind: &response::Kind) -> ErrorCode {
    match kind {
        response::Kind::Error(error) => error.code(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_reports_limits_and_authenticates_by_token() {
    let server = Server::start(test_limits()).await;
    let anonymous = server.client(ClientOptions::default()).await;
    let info = anonymous.server_info().unwrap();
    assert_eq!(info.protocol_version, 1);
    assert_eq!(info.user_id, 0);
    let limits = info.limits.unwrap();
    assert_eq!(
        limits.frame_bytes_max,
        chatlog_wire::limits::FRAME_BYTES_MAX
    );
    assert_eq!(
        limits.requests_in_flight_max,
        gateway::REQUESTS_IN_FLIGHT_MAX
    );

    let options = ClientOptions {
        token: Some("tok-42".into()),
        ..ClientOptions::default()
    };
    let authenticated = server.client(options).await;
    assert_eq!(authenticated.server_info().unwrap().user_id, 42);

    let options = ClientOptions {
        token: Some("forged".into()),
        ..ClientOptions::default()
    };
    let refused = Client::connect(&server.addr, options).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(ErrorCode::Unauthenticated),
        "{refused}"
    );

    // A version the server does not speak: a typed error, then the close.
    let mut raw = Raw::connect(&server.addr).await;
    raw.send(v1::Frame::request(
        1,
        request::Kind::Handshake(v1::Handshake {
            protocol_version: 0,
            ..Default::default()
        }),
    ))
    .await;
    assert_eq!(
        error_code(&raw.response(1).await),
        ErrorCode::UnsupportedVersion
    );
    raw.expect_closed().await;

    // Anything but a handshake first: Disconnect(BAD_REQUEST).
    let mut raw = Raw::connect(&server.addr).await;
    raw.send(v1::Frame::request(
        1,
        request::Kind::Ping(v1::PingRequest { nonce: 1 }),
    ))
    .await;
    raw.expect_disconnect(ErrorCode::BadRequest).await;

    // A second handshake is a typed error; the connection stays up.
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send(v1::Frame::request(
        2,
        request::Kind::Handshake(v1::Handshake::default()),
    ))
    .await;
    assert_eq!(error_code(&raw.response(2).await), ErrorCode::BadRequest);
    raw.send(v1::Frame::request(
        3,
        request::Kind::Ping(v1::PingRequest { nonce: 9 }),
    ))
    .await;
    assert!(matches!(raw.response(3).await, response::Kind::Ping(ping) if ping.nonce == 9));
}

#[tokio::test]
async fn pipelined_calls_on_one_connection_complete_out_of_order() {
    let server = Server::start(test_limits()).await;
    let client = server.client(ClientOptions::default()).await;
    const WAITERS: u64 = 50;

    // WAITERS requests in flight at once on one connection, each blocked at its gate.
    let mut waiters = Vec::new();
    for key in 0..WAITERS {
        let client = client.clone();
        waiters.push(tokio::spawn(async move {
            client
                .history(v1::HistoryRequest {
                    chat_id: key,
                    ..Default::default()
                })
                .await
        }));
    }
    let mut waiting = server.fixture.waiting.subscribe();
    within(waiting.wait_for(|waiting| *waiting == WAITERS as usize))
        .await
        .unwrap();

    // Many more calls overtake them meanwhile.
    let mut pings = Vec::new();
    for nonce in 0..200 {
        let client = client.clone();
        pings.push(tokio::spawn(async move {
            client.ping(v1::PingRequest { nonce }).await
        }));
    }
    for (nonce, ping) in pings.into_iter().enumerate() {
        assert_eq!(within(ping).await.unwrap().unwrap().nonce, nonce as u64);
    }

    // Open the gates last-first: the last request sent completes first.
    for key in (0..WAITERS).rev() {
        let marked = client
            .mark_read(v1::MarkReadRequest {
                chat_id: key,
                seq: key + 1,
            })
            .await
            .unwrap();
        assert_eq!(marked.read_seq, key + 1);
        let waiter = &mut waiters[key as usize];
        let page = within(waiter).await.unwrap().unwrap();
        assert_eq!(page.head_seq, key, "response paired with the wrong request");
    }
}

#[tokio::test]
async fn subscription_pushes_follow_their_response() {
    let server = Server::start(test_limits()).await;

    // The fixture pushes before its handler returns; the gateway holds the pushes
    // until the response is queued, so the response still comes first.
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send(v1::Frame::request(
        7,
        request::Kind::Subscribe(v1::SubscribeRequest {
            chat_id: 3,
            from_seq: 5,
        }),
    ))
    .await;
    assert!(matches!(
        raw.response(7).await,
        response::Kind::Subscribe(_)
    ));
    for seq in 1..=5 {
        let frame = raw.next().await.unwrap();
        assert_eq!(frame.request_id, 7);
        match frame.body {
            Some(frame::Body::Push(v1::Push {
                kind: Some(push::Kind::ChatEvents(events)),
            })) => assert_eq!(events.events[0].seq, seq),
            other => panic!("expected chat events, got {other:?}"),
        }
    }

    // The same through the client.
    let client = server.client(ClientOptions::default()).await;
    let mut pushes = client.pushes().unwrap();
    let (subscription, response) = client
        .subscribe_with_id(v1::SubscribeRequest {
            chat_id: 4,
            from_seq: 3,
        })
        .await
        .unwrap();
    assert_eq!(response.head_seq, 3);
    for seq in 1..=3 {
        match within(pushes.recv()).await.unwrap() {
            PushItem::Push {
                request_id,
                push: push::Kind::ChatEvents(events),
            } => {
                assert_eq!(request_id, subscription);
                assert_eq!(events.events[0].seq, seq);
            }
            other => panic!("expected chat events, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn slow_push_reader_is_disconnected_without_stalling_others() {
    let limits = GatewayLimits {
        push_queue_len_max: 8,
        write_timeout: Duration::from_secs(2),
        ..test_limits()
    };
    let server = Server::start(limits).await;
    let (report, flooded) = oneshot::channel();
    *server.fixture.flood_result.lock().unwrap() = Some(report);

    // This connection asks for a flood of pushes and never reads.
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send(v1::Frame::request(
        2,
        request::Kind::GetUnreadCounts(v1::GetUnreadCountsRequest::default()),
    ))
    .await;
    let (pushed, failure) = within(flooded).await.unwrap();
    assert_eq!(failure, PushError::SlowReader, "after {pushed} pushes");

    // Others are served meanwhile.
    let client = server.client(ClientOptions::default()).await;
    client.ping(v1::PingRequest { nonce: 1 }).await.unwrap();

    // The slow connection is closed: what was sent before the cut, then the end.
    raw.expect_closed().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_too_large() {
    let limits = GatewayLimits {
        frame_bytes_max: 1024,
        ..test_limits()
    };
    let server = Server::start(limits).await;
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send_bytes(&1025u32.to_le_bytes()).await;
    raw.expect_disconnect(ErrorCode::TooLarge).await;

    // The client refuses to send a request over the server's limit; nothing is sent
    // and its connection stays up.
    let client = server.client(ClientOptions::default()).await;
    let too_large = client
        .send_message(v1::SendMessageRequest {
            chat_id: 1,
            client_message_id: 1,
            text: "x".repeat(2048),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(too_large, ClientError::Encode(_)), "{too_large}");
    client.ping(v1::PingRequest { nonce: 2 }).await.unwrap();
}

#[tokio::test]
async fn garbage_bytes_close_the_connection_and_the_server_keeps_serving() {
    let server = Server::start(test_limits()).await;
    let client = server.client(ClientOptions::default()).await;

    // Before the handshake: an HTTP request reads as a huge length.
    let mut raw = Raw::connect(&server.addr).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    raw.expect_disconnect(ErrorCode::TooLarge).await;

    // After it: a zero length, and a payload that is not a Frame.
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send_bytes(&0u32.to_le_bytes()).await;
    raw.expect_disconnect(ErrorCode::BadRequest).await;

    let mut raw = Raw::handshaken(&server.addr).await;
    let mut bytes = BytesMut::new();
    encode_payload(&[0xff; 16], 1024, &mut bytes).unwrap();
    raw.send_bytes(&bytes).await;
    raw.expect_disconnect(ErrorCode::BadRequest).await;

    // A response sent by a client is a protocol violation too.
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send(v1::Frame::response(
        2,
        response::Kind::Ping(v1::PingResponse::default()),
    ))
    .await;
    raw.expect_disconnect(ErrorCode::BadRequest).await;

    // A truncated frame followed by the end of the stream: closed.
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.send_bytes(&[10, 0, 0, 0, 1, 2]).await;
    raw.writer.shutdown().await.unwrap();
    raw.expect_closed().await;

    // The well-behaved connection never noticed.
    for nonce in 0..10 {
        assert_eq!(
            client.ping(v1::PingRequest { nonce }).await.unwrap().nonce,
            nonce
        );
    }
}

#[tokio::test]
async fn unknown_request_kind_and_bad_ids_get_typed_errors() {
    let limits = GatewayLimits {
        requests_in_flight_max: 4,
        ..test_limits()
    };
    let server = Server::start(limits).await;
    let mut raw = Raw::handshaken(&server.addr).await;

    // An empty kind (a kind newer than the server): UNKNOWN_REQUEST, still connected.
    raw.send(v1::Frame {
        request_id: 5,
        body: Some(frame::Body::Request(v1::Request { kind: None })),
    })
    .await;
    assert_eq!(
        error_code(&raw.response(5).await),
        ErrorCode::UnknownRequest
    );

    // Request id 0: BAD_REQUEST, with id 0.
    raw.send(v1::Frame::request(
        0,
        request::Kind::Ping(v1::PingRequest { nonce: 1 }),
    ))
    .await;
    assert_eq!(error_code(&raw.response(0).await), ErrorCode::BadRequest);

    // Over the in-flight limit: RATE_LIMITED with a retry-after, still connected.
    for request_id in 10..14 {
        raw.send(v1::Frame::request(
            request_id,
            request::Kind::History(v1::HistoryRequest {
                chat_id: request_id,
                ..Default::default()
            }),
        ))
        .await;
    }
    raw.send(v1::Frame::request(
        14,
        request::Kind::History(v1::HistoryRequest::default()),
    ))
    .await;
    match raw.response(14).await {
        response::Kind::Error(error) => {
            assert_eq!(error.code(), ErrorCode::RateLimited);
            assert_eq!(error.retry_after_ms, gateway::IN_FLIGHT_RETRY_AFTER_MS);
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    raw.send(v1::Frame::request(
        15,
        request::Kind::Ping(v1::PingRequest { nonce: 3 }),
    ))
    .await;
    assert!(matches!(raw.response(15).await, response::Kind::Ping(_)));

    // Reusing an id still in flight: Disconnect(BAD_REQUEST).
    raw.send(v1::Frame::request(
        10,
        request::Kind::History(v1::HistoryRequest::default()),
    ))
    .await;
    raw.expect_disconnect(ErrorCode::BadRequest).await;
}

#[tokio::test]
async fn idle_connection_is_closed_with_timeout() {
    let limits = GatewayLimits {
        idle_timeout: Duration::from_millis(200),
        handshake_timeout: Duration::from_millis(200),
        ..test_limits()
    };
    let server = Server::start(limits).await;
    let mut raw = Raw::handshaken(&server.addr).await;
    raw.expect_disconnect(ErrorCode::Timeout).await;

    // No handshake in time either.
    let mut raw = Raw::connect(&server.addr).await;
    raw.expect_disconnect(ErrorCode::Timeout).await;
}

#[tokio::test]
async fn connection_limit_refuses_extra_connections() {
    let limits = GatewayLimits {
        connections_max: 2,
        ..test_limits()
    };
    let server = Server::start(limits).await;
    let first = server.client(ClientOptions::default()).await;
    let _second = server.client(ClientOptions::default()).await;
    let refused = Client::connect(&server.addr, ClientOptions::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");

    // A slot frees when a connection closes; the server notices asynchronously, so
    // retry for a bounded time.
    drop(first);
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    loop {
        match Client::connect(&server.addr, ClientOptions::default()).await {
            Ok(third) => {
                third.ping(v1::PingRequest { nonce: 1 }).await.unwrap();
                break;
            }
            Err(error) => {
                assert_eq!(error.code(), Some(ErrorCode::Unavailable), "{error}");
                assert!(tokio::time::Instant::now() < deadline, "no slot freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn send_is_retried_after_a_drop_with_the_same_client_message_id() {
    let server = Server::start(test_limits()).await;
    let options = ClientOptions {
        reconnect: ReconnectPolicy {
            attempts_max: 3,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
        },
        ..ClientOptions::default()
    };
    let client = server.client(options).await;
    // The login's token is what the redial authenticates with: the retried send needs a
    // session.
    client
        .login(v1::LoginRequest {
            user_id: 3,
            login_token: "dev".into(),
            device_id: "laptop".into(),
            device_name: String::new(),
        })
        .await
        .unwrap();

    // A request that is not safe to repeat is in flight when the connection drops.
    let blocked_call = {
        let client = client.clone();
        tokio::spawn(async move { client.create_chat(v1::CreateChatRequest::default()).await })
    };
    let mut blocked = server.fixture.blocked.subscribe();
    within(blocked.wait_for(|blocked| *blocked == 1))
        .await
        .unwrap();

    server.fixture.drop_next_send.store(true, Ordering::SeqCst);
    let sent = within(client.send_message(v1::SendMessageRequest {
        chat_id: 9,
        client_message_id: 77,
        text: "hello".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(sent.seq, 1);
    assert!(
        sent.deduplicated,
        "the retry must reuse the client message id"
    );
    assert_eq!(sent.timestamp_ms, 3, "committed by the logged-in user");
    assert_eq!(server.fixture.handshakes.load(Ordering::SeqCst), 2);
    assert_eq!(
        server.fixture.heads.lock().unwrap()[&9],
        1,
        "one message only"
    );
    assert_eq!(client.server_info().unwrap().user_id, 3);

    let failed = within(blocked_call).await.unwrap().unwrap_err();
    assert!(matches!(failed, ClientError::Disconnected), "{failed}");

    // A new message on the new connection gets the next seq.
    let next = client
        .send_message(v1::SendMessageRequest {
            chat_id: 9,
            client_message_id: 78,
            text: "again".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((next.seq, next.deduplicated), (2, false));
}

#[tokio::test]
async fn shutdown_disconnects_clients_with_unavailable() {
    let mut server = Server::start(test_limits()).await;
    let options = ClientOptions {
        reconnect: ReconnectPolicy::never(),
        ..ClientOptions::default()
    };
    let client = server.client(options).await;
    let mut pushes = client.pushes().unwrap();
    server.stop.take().unwrap().send(()).unwrap();
    match within(pushes.recv()).await.unwrap() {
        PushItem::Push {
            push: push::Kind::Disconnect(disconnect),
            ..
        } => assert_eq!(disconnect.reason.unwrap().code(), ErrorCode::Unavailable),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert_eq!(within(pushes.recv()).await, Some(PushItem::ConnectionLost));
    within(&mut server.task).await.unwrap();
    let after = client.ping(v1::PingRequest { nonce: 1 }).await.unwrap_err();
    assert!(matches!(after, ClientError::Disconnected), "{after}");
}
