//! The gateway's inline path (`Service::runs_inline`): requests the service names are
//! polled on their connection's task instead of a task each. Over real sockets on
//! 127.0.0.1 with the real `chatlog_wire::Client`, these tests prove that inline requests
//! keep what spawned ones promise: they run concurrently with each other and with the
//! connection's other requests, count against the in-flight limit, a panic answers
//! `INTERNAL` and leaves the connection up, and a closed connection cancels them.
//!
//! The fixture runs `send_message` inline (and everything else in a task of its own):
//! text `"block"` waits until `mark_read` opens the gate, `"panic"` panics, any other
//! text is answered at once with seq = client message id.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use chatlog::gateway::{self, ConnCtx, GatewayLimits, Principal, Service};
use chatlog_wire::client::{Client, ClientError, ClientOptions, ReconnectPolicy};
use chatlog_wire::frame::{FrameReader, decode_message, encode_message};
use chatlog_wire::limits::{FRAME_BYTES_MAX, PROTOCOL_VERSION};
use chatlog_wire::proto::v1::{self, ErrorCode, frame, request, response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};

/// Limit on every wait in these tests, so a bug fails a test instead of hanging it.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Fixture {
    gate: Notify,
    /// Inline `send_message` calls running now (incremented on entry, decremented when
    /// the call's future is dropped, finished or cancelled).
    running: watch::Sender<u64>,
    /// `send_message` calls answered through `handle_inline`.
    inline_answers: AtomicU64,
}

/// Counts a running inline call down when dropped: finished or cancelled alike.
struct Running<'a>(&'a watch::Sender<u64>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Fixture {
    async fn send(&self, send: v1::SendMessageRequest) -> Result<response::Kind, v1::Error> {
        self.running.send_modify(|n| *n += 1);
        let _running = Running(&self.running);
        match send.text.as_str() {
            "block" => self.gate.notified().await,
            "panic" => panic!("the fixture panics on request"),
            _ => {}
        }
        Ok(response::Kind::SendMessage(v1::SendMessageResponse {
            chat_id: send.chat_id,
            seq: send.client_message_id,
            timestamp_ms: 0,
            deduplicated: false,
        }))
    }
}

impl Service for Fixture {
    async fn authenticate(&self, _token: Option<&str>) -> Result<Option<Principal>, v1::Error> {
        Ok(Some(Principal {
            user_id: 1,
            session_id: 1,
            device_id: "".into(),
        }))
    }

    async fn handle(
        &self,
        _conn: &ConnCtx,
        _request_id: u64,
        request: request::Kind,
    ) -> Result<response::Kind, v1::Error> {
        match request {
            request::Kind::MarkRead(mark) => {
                for _ in 0..mark.seq {
                    self.gate.notify_one();
                }
                Ok(response::Kind::MarkRead(v1::MarkReadResponse {
                    chat_id: mark.chat_id,
                    read_seq: mark.seq,
                    unread_count: 0,
                }))
            }
            request::Kind::SendMessage(_) => Err(v1::Error::new(
                ErrorCode::Internal,
                "send_message must take the inline path",
            )),
            _ => Err(v1::Error::new(ErrorCode::Internal, "not in the fixture")),
        }
    }

    async fn handle_inline(
        &self,
        _conn: &ConnCtx,
        _request_id: u64,
        request: request::Kind,
    ) -> Result<response::Kind, v1::Error> {
        let request::Kind::SendMessage(send) = request else {
            return Err(v1::Error::new(ErrorCode::Internal, "only sends run inline"));
        };
        let answer = self.send(send).await;
        self.inline_answers.fetch_add(1, Ordering::SeqCst);
        answer
    }

    fn runs_inline(&self, request: &request::Kind) -> bool {
        matches!(request, request::Kind::SendMessage(_))
    }
}

struct Server {
    addr: String,
    fixture: Arc<Fixture>,
    _stop: oneshot::Sender<()>,
}

async fn start(limits: GatewayLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fixture = Arc::new(Fixture::default());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(gateway::serve(
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
        _stop: stop,
    }
}

async fn client(addr: &str) -> Client {
    Client::connect(
        addr,
        ClientOptions {
            reconnect: ReconnectPolicy::never(),
            retries_max: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap()
}

fn send(id: u64, text: &str) -> v1::SendMessageRequest {
    v1::SendMessageRequest {
        chat_id: 7,
        client_message_id: id,
        text: text.into(),
        ..Default::default()
    }
}

async fn open_gate(client: &Client, waiters: u64) {
    client
        .mark_read(v1::MarkReadRequest {
            chat_id: 7,
            seq: waiters,
        })
        .await
        .unwrap();
}

async fn wait_running(fixture: &Fixture, n: u64) {
    let mut running = fixture.running.subscribe();
    tokio::time::timeout(TEST_TIMEOUT, running.wait_for(|r| *r == n))
        .await
        .expect("inline calls running in time")
        .unwrap();
}

/// Two inline sends wait on one connection while a third inline send and a spawned
/// request on the same connection are answered; then both waiting ones are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_requests_run_concurrently_with_the_connections_others() {
    let server = start(GatewayLimits::default()).await;
    let c = client(&server.addr).await;
    let blocked: Vec<_> = (1..=2)
        .map(|id| {
            let c = c.clone();
            tokio::spawn(async move { c.send_message(send(id, "block")).await })
        })
        .collect();
    wait_running(&server.fixture, 2).await;

    let quick = tokio::time::timeout(TEST_TIMEOUT, c.send_message(send(3, "quick")))
        .await
        .expect("answered while two others wait")
        .unwrap();
    assert_eq!(quick.seq, 3);
    assert!(blocked.iter().all(|b| !b.is_finished()));

    // A spawned request (mark_read) on the same connection opens the gate for both.
    open_gate(&c, 2).await;
    for (i, b) in blocked.into_iter().enumerate() {
        let answered = tokio::time::timeout(TEST_TIMEOUT, b)
            .await
            .expect("answered once the gate opened")
            .unwrap()
            .unwrap();
        assert_eq!(answered.seq, i as u64 + 1);
    }
    assert_eq!(server.fixture.inline_answers.load(Ordering::SeqCst), 3);
}

/// Inline requests count against the per-connection in-flight limit like any other:
/// with a limit of 2 and two inline sends waiting, a third is refused `RATE_LIMITED` at
/// once. Raw frames, since the client library caps itself at the server's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_requests_count_against_the_in_flight_limit() {
    let server = start(GatewayLimits {
        requests_in_flight_max: 2,
        ..GatewayLimits::default()
    })
    .await;
    let stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = FrameReader::new(read_half, FRAME_BYTES_MAX);
    let mut bytes = BytesMut::new();
    let handshake = v1::Frame::request(
        1,
        request::Kind::Handshake(v1::Handshake {
            protocol_version: PROTOCOL_VERSION,
            client_name: "raw".into(),
            session_token: String::new(),
            no_live_pushes: false,
        }),
    );
    encode_message(&handshake, FRAME_BYTES_MAX, &mut bytes).unwrap();
    for id in 2..=4 {
        let frame = v1::Frame::request(id, request::Kind::SendMessage(send(id, "block")));
        encode_message(&frame, FRAME_BYTES_MAX, &mut bytes).unwrap();
    }
    write_half.write_all(&bytes).await.unwrap();
    let mut next = async || -> v1::Frame {
        let payload = tokio::time::timeout(TEST_TIMEOUT, reader.next_frame())
            .await
            .expect("a frame in time")
            .unwrap()
            .expect("the connection stays open");
        decode_message(payload).unwrap()
    };
    let ok = next().await;
    assert!(matches!(
        ok.body,
        Some(frame::Body::Response(v1::Response {
            kind: Some(response::Kind::HandshakeOk(_))
        }))
    ));
    let refused = next().await;
    assert_eq!(refused.request_id, 4, "{refused:?}");
    match refused.body {
        Some(frame::Body::Response(v1::Response {
            kind: Some(response::Kind::Error(e)),
        })) => assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}"),
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    wait_running(&server.fixture, 2).await;
    // Both waiting sends are answered once the gate opens (from another connection).
    open_gate(&client(&server.addr).await, 2).await;
    let mut answered = vec![next().await.request_id, next().await.request_id];
    answered.sort_unstable();
    assert_eq!(answered, [2, 3]);
}

/// A panicking inline handler is answered with `INTERNAL`; the connection stays up and
/// its other requests, waiting ones included, are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_inline_request_is_answered_internal_and_the_connection_stays() {
    let server = start(GatewayLimits::default()).await;
    let c = client(&server.addr).await;
    let blocked = {
        let c = c.clone();
        tokio::spawn(async move { c.send_message(send(1, "block")).await })
    };
    wait_running(&server.fixture, 1).await;
    match c.send_message(send(2, "panic")).await {
        Err(ClientError::Server {
            code: ErrorCode::Internal,
            ..
        }) => {}
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    assert_eq!(c.send_message(send(3, "after")).await.unwrap().seq, 3);
    open_gate(&c, 1).await;
    let answered = tokio::time::timeout(TEST_TIMEOUT, blocked)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(answered.seq, 1);
}

/// Closing a connection cancels its inline requests (their futures are dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_cancels_its_inline_requests() {
    let server = start(GatewayLimits::default()).await;
    let c = client(&server.addr).await;
    let blocked: Vec<_> = (1..=3)
        .map(|id| {
            let c = c.clone();
            tokio::spawn(async move { c.send_message(send(id, "block")).await })
        })
        .collect();
    wait_running(&server.fixture, 3).await;
    for b in &blocked {
        b.abort();
    }
    drop(c);
    // Nobody opens the gate: only the cancellation can bring the count to 0.
    wait_running(&server.fixture, 0).await;
    assert_eq!(server.fixture.inline_answers.load(Ordering::SeqCst), 0);
}
