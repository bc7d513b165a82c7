//! The client against scripted servers on 127.0.0.1: each test's server answers frames
//! as the test says, so the client's side of pushes, retries, timeouts and refusals can
//! be checked exactly. The gateway's tests (`tests/gateway.rs` in the root package) run
//! the client against the real server.

use std::time::Duration;

use tokio::net::TcpListener;

use super::*;
use crate::frame::write_message;

/// Limit on every wait, so that a bug fails the test instead of hanging it.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// What a scripted server does with one request frame: the frames to send back.
type Script = Box<dyn FnMut(u64, request::Kind) -> Vec<v1::Frame> + Send>;

/// Starts a server that accepts one connection, answers its handshake with
/// `handshake_reply` (given the handshake's request id), then each request with
/// `script`. Returns its address.
async fn scripted_server(handshake_reply: fn(u64) -> v1::Frame, mut script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read_half, mut write_half) = stream.into_split();
        let mut reader = FrameReader::new(read_half, FRAME_BYTES_MAX);
        let handshake: v1::Frame = reader.next_message().await.unwrap().unwrap();
        let reply = handshake_reply(handshake.request_id);
        write_message(&mut write_half, &reply, FRAME_BYTES_MAX)
            .await
            .unwrap();
        while let Ok(Some(frame)) = reader.next_message::<v1::Frame>().await {
            let Some(v1::frame::Body::Request(v1::Request { kind: Some(kind) })) = frame.body
            else {
                panic!("the client sent {frame:?}");
            };
            for reply in script(frame.request_id, kind) {
                write_message(&mut write_half, &reply, FRAME_BYTES_MAX)
                    .await
                    .unwrap();
            }
        }
    });
    addr
}

fn handshake_ok(request_id: u64) -> v1::Frame {
    v1::Frame::response(
        request_id,
        response::Kind::HandshakeOk(v1::HandshakeOk {
            protocol_version: PROTOCOL_VERSION,
            limits: Some(v1::Limits {
                frame_bytes_max: FRAME_BYTES_MAX,
                requests_in_flight_max: 8,
                ..Default::default()
            }),
            ..Default::default()
        }),
    )
}

fn user_event(seq: u64) -> v1::Frame {
    v1::Frame::push(
        0,
        push::Kind::UserEvent(v1::UserEvent {
            user_id: 1,
            seq,
            ..Default::default()
        }),
    )
}

fn pong(request_id: u64, nonce: u64) -> v1::Frame {
    v1::Frame::response(
        request_id,
        response::Kind::Ping(v1::PingResponse {
            nonce,
            server_time_ms: 0,
        }),
    )
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, future)
        .await
        .expect("the test timed out")
}

fn pushed_seq(item: Option<PushItem>) -> u64 {
    match item {
        Some(PushItem::Push {
            push: push::Kind::UserEvent(event),
            ..
        }) => event.seq,
        other => panic!("expected a user event, got {other:?}"),
    }
}

#[tokio::test]
async fn push_overflow_is_reported_once_in_place_of_the_gap() {
    let addr = scripted_server(
        handshake_ok,
        Box::new(|request_id, kind| match kind {
            // Ten pushes, then the answer: by the time the call returns, the client has
            // routed all ten.
            request::Kind::Ping(ping) if ping.nonce == 1 => {
                let mut frames: Vec<_> = (1..=10).map(user_event).collect();
                frames.push(pong(request_id, 1));
                frames
            }
            request::Kind::Ping(ping) => vec![user_event(100), pong(request_id, ping.nonce)],
            other => panic!("unexpected {other:?}"),
        }),
    )
    .await;
    let options = ClientOptions {
        push_queue_len_max: 4,
        ..ClientOptions::default()
    };
    let client = within(Client::connect(&addr, options)).await.unwrap();
    let mut pushes = client.pushes().unwrap();
    assert!(client.pushes().is_none(), "the receiver is handed out once");

    within(client.ping(v1::PingRequest { nonce: 1 }))
        .await
        .unwrap();
    for seq in 1..=4 {
        assert_eq!(pushed_seq(within(pushes.recv()).await), seq);
    }
    assert_eq!(
        within(pushes.recv()).await,
        Some(PushItem::Lagged { dropped: 6 })
    );
    within(client.ping(v1::PingRequest { nonce: 2 }))
        .await
        .unwrap();
    assert_eq!(pushed_seq(within(pushes.recv()).await), 100);
}

#[tokio::test]
async fn rate_limited_requests_are_repeated_and_unanswered_ones_time_out() {
    let mut refused_once = false;
    let addr = scripted_server(
        handshake_ok,
        Box::new(move |request_id, kind| match kind {
            request::Kind::History(_) if !refused_once => {
                refused_once = true;
                vec![v1::Frame::response(
                    request_id,
                    response::Kind::Error(v1::Error {
                        code: v1::ErrorCode::RateLimited.into(),
                        message: "slow down".into(),
                        retry_after_ms: 1,
                    }),
                )]
            }
            request::Kind::History(_) => vec![v1::Frame::response(
                request_id,
                response::Kind::History(v1::HistoryResponse {
                    head_seq: 5,
                    ..Default::default()
                }),
            )],
            // Never answered.
            request::Kind::GetBySeq(_) => Vec::new(),
            request::Kind::CreateChat(_) => vec![v1::Frame::response(
                request_id,
                response::Kind::Error(v1::Error::new(v1::ErrorCode::PermissionDenied, "no")),
            )],
            // The wrong kind of answer.
            request::Kind::Ping(_) => vec![v1::Frame::response(
                request_id,
                response::Kind::Unsubscribe(v1::UnsubscribeResponse {}),
            )],
            other => panic!("unexpected {other:?}"),
        }),
    )
    .await;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let client = within(Client::connect(&addr, options)).await.unwrap();

    let page = within(client.history(v1::HistoryRequest::default()))
        .await
        .unwrap();
    assert_eq!(page.head_seq, 5);

    let timed_out = within(client.get_by_seq(v1::GetBySeqRequest::default()))
        .await
        .unwrap_err();
    assert!(matches!(timed_out, ClientError::Timeout), "{timed_out}");

    let refused = within(client.create_chat(v1::CreateChatRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(v1::ErrorCode::PermissionDenied));

    let confused = within(client.ping(v1::PingRequest::default()))
        .await
        .unwrap_err();
    assert!(matches!(confused, ClientError::Protocol(_)), "{confused}");

    let handshake = within(client.call(request::Kind::Handshake(v1::Handshake::default())))
        .await
        .unwrap_err();
    assert!(matches!(handshake, ClientError::Protocol(_)), "{handshake}");
}

#[tokio::test]
async fn refused_handshakes_are_typed_errors() {
    let addr = scripted_server(
        |request_id| {
            v1::Frame::response(
                request_id,
                response::Kind::Error(v1::Error::new(
                    v1::ErrorCode::UnsupportedVersion,
                    "speaks [1]",
                )),
            )
        },
        Box::new(|_, _| Vec::new()),
    )
    .await;
    let refused = within(Client::connect(&addr, ClientOptions::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(v1::ErrorCode::UnsupportedVersion));

    let addr = scripted_server(
        |_| {
            v1::Frame::push(
                0,
                push::Kind::Disconnect(v1::Disconnect {
                    reason: Some(v1::Error {
                        code: v1::ErrorCode::Unavailable.into(),
                        message: "full".into(),
                        retry_after_ms: 1000,
                    }),
                }),
            )
        },
        Box::new(|_, _| Vec::new()),
    )
    .await;
    match within(Client::connect(&addr, ClientOptions::default())).await {
        Err(ClientError::Server {
            code: v1::ErrorCode::Unavailable,
            retry_after,
            ..
        }) => assert_eq!(retry_after, Some(Duration::from_secs(1))),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test]
async fn a_dead_address_is_an_io_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let error = within(Client::connect(&addr, ClientOptions::default()))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Io(_)), "{error}");
}

#[test]
fn backoff_doubles_up_to_its_maximum() {
    let policy = ReconnectPolicy {
        attempts_max: 10,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    };
    let waits: Vec<_> = (0..6).map(|attempt| policy.backoff(attempt)).collect();
    let ms = |ms| Duration::from_millis(ms);
    assert_eq!(waits, [ms(0), ms(10), ms(20), ms(40), ms(50), ms(50)]);
    assert_eq!(policy.backoff(u32::MAX), ms(50));
}

/// The client skips decoding a push only when it is a live push (request id 0) by its
/// first bytes; every other frame, and every push of a subscription, is decoded.
#[test]
fn only_live_pushes_are_recognised_undecoded() {
    let encoded = |frame: &v1::Frame| prost::Message::encode_to_vec(frame);
    assert!(is_live_push(&encoded(&user_event(1))));
    let ended = v1::Frame::push(
        7,
        push::Kind::SubscriptionEnded(v1::SubscriptionEnded::default()),
    );
    assert!(!is_live_push(&encoded(&ended)));
    assert!(!is_live_push(&encoded(&pong(3, 1))));
    assert!(!is_live_push(&encoded(&v1::Frame::request(
        4,
        request::Kind::Ping(v1::PingRequest { nonce: 1 })
    ))));
    // A request id of 0 written out (proto3 leaves it out, another encoder may not).
    let mut explicit = vec![0x08, 0x00];
    explicit.extend(encoded(&user_event(1)));
    assert!(is_live_push(&explicit));
    assert!(!is_live_push(&[]));
}

/// A scripted server holding one file of `content` (whole parts and a short last one):
/// `media_info` answers its size, `media_download` the asked range with the CRC-32 that
/// `crc_of(offset, bytes)` gives (a correct server gives `crc32fast::hash(bytes)`), the
/// bytes being `served` (a correct server serves `content`).
async fn media_server(
    content: Vec<u8>,
    served: Vec<u8>,
    crc_of: fn(u64, &[u8]) -> u32,
) -> (String, [u8; crate::limits::MEDIA_SHA256_BYTES]) {
    use sha2::Digest;
    let sha: [u8; crate::limits::MEDIA_SHA256_BYTES] = sha2::Sha256::digest(&content).into();
    let size = content.len() as u64;
    let addr = scripted_server(
        handshake_ok,
        Box::new(move |request_id, kind| match kind {
            request::Kind::MediaInfo(_) => vec![v1::Frame::response(
                request_id,
                response::Kind::MediaInfo(v1::MediaInfoResponse {
                    media: Some(v1::MediaRef {
                        sha256: Bytes::copy_from_slice(&sha),
                        size_bytes: size,
                        ..Default::default()
                    }),
                }),
            )],
            request::Kind::MediaDownload(r) => {
                let end = (r.offset + u64::from(r.length)).min(size) as usize;
                let data = &served[r.offset as usize..end];
                vec![v1::Frame::response(
                    request_id,
                    response::Kind::MediaDownload(v1::MediaDownloadResponse {
                        offset: r.offset,
                        crc32: crc_of(r.offset, data),
                        data: Bytes::copy_from_slice(data),
                        size_bytes: size,
                    }),
                )]
            }
            other => panic!("unexpected {other:?}"),
        }),
    )
    .await;
    (addr, sha)
}

/// Three chunks' worth of bytes (the last one short), deterministic.
fn media_content() -> Vec<u8> {
    let len = 2 * crate::limits::MEDIA_DOWNLOAD_BYTES_MAX as usize + 1234;
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test]
async fn a_download_checks_every_chunk_against_its_crc_and_the_sha256_when_asked() {
    use crate::limits::MEDIA_DOWNLOAD_BYTES_MAX as CHUNK;
    let content = media_content();
    let right = |_: u64, b: &[u8]| crc32fast::hash(b);

    // An honest server: both checks pass.
    for check in [DownloadCheck::PartCrcs, DownloadCheck::Sha256] {
        let (addr, sha) = media_server(content.clone(), content.clone(), right).await;
        let client = within(Client::connect(&addr, ClientOptions::default()))
            .await
            .unwrap();
        let n = within(client.download_checked(sha, 0, check, |_| {}))
            .await
            .unwrap_or_else(|e| panic!("{check:?}: {e}"));
        assert_eq!(n, content.len() as u64);
    }

    // The second chunk's bytes changed after its CRC was taken (damage on the way or
    // on the server's disk after its check): refused by the chunk check alone.
    let mut damaged = content.clone();
    damaged[CHUNK as usize + 99] ^= 0x20;
    let stored_crc = |offset: u64, b: &[u8]| {
        let content = media_content();
        let end = offset as usize + b.len();
        crc32fast::hash(&content[offset as usize..end])
    };
    for check in [DownloadCheck::PartCrcs, DownloadCheck::Sha256] {
        let (addr, sha) = media_server(content.clone(), damaged.clone(), stored_crc).await;
        let client = within(Client::connect(&addr, ClientOptions::default()))
            .await
            .unwrap();
        let e = within(client.download_checked(sha, 0, check, |_| {}))
            .await
            .expect_err("a chunk that fails its CRC is refused");
        assert!(
            matches!(&e, ClientError::Protocol(m) if m.contains(&format!("offset {CHUNK}")) && m.contains("CRC")),
            "{check:?}: {e}"
        );
    }

    // A server that sends other bytes with their own CRC passes the chunk check; the
    // SHA-256 check refuses it.
    let (addr, sha) = media_server(content.clone(), damaged.clone(), right).await;
    let client = within(Client::connect(&addr, ClientOptions::default()))
        .await
        .unwrap();
    let e = within(client.download_checked(sha, 0, DownloadCheck::Sha256, |_| {}))
        .await
        .expect_err("bytes that do not hash to the media id are refused");
    assert!(
        matches!(&e, ClientError::Protocol(m) if m.contains("does not hash")),
        "{e}"
    );

    // A resumed download keeps bytes from the local disk: they are checked against the
    // SHA-256 even when only chunk CRCs were asked for. A kept first chunk with one
    // byte flipped is reported, never returned as the file.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    let mut partial = content[..CHUNK as usize].to_vec();
    partial[5] ^= 1;
    std::fs::write(&out, &partial).unwrap();
    let (addr, sha) = media_server(content.clone(), content.clone(), right).await;
    let client = within(Client::connect(&addr, ClientOptions::default()))
        .await
        .unwrap();
    let options = DownloadOptions {
        resume: true,
        check: DownloadCheck::PartCrcs,
        ..Default::default()
    };
    let e = within(client.download_file(sha, &out, options.clone(), |_| {}))
        .await
        .expect_err("a damaged kept chunk is found by the SHA-256");
    assert!(
        matches!(&e, ClientError::Protocol(m) if m.contains("does not hash")),
        "{e}"
    );
    // The same resume from an intact partial file succeeds, byte for byte.
    std::fs::write(&out, &content[..CHUNK as usize]).unwrap();
    let (addr, sha) = media_server(content.clone(), content.clone(), right).await;
    let client = within(Client::connect(&addr, ClientOptions::default()))
        .await
        .unwrap();
    within(client.download_file(sha, &out, options, |_| {}))
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == content);
}

/// The reader's deadline sweep (`TIMEOUT_SWEEP_FRACTION`): a request times out no
/// earlier than its timeout and within a sweep period or so after it; the sweep stops
/// when nobody waits and restarts with the next request (a second unanswered request,
/// sent after the sweep stopped, times out too); and a timed-out request keeps its
/// in-flight slot until the server answers (the server counts it until then), when its
/// late answer releases it and finds no caller.
#[tokio::test]
async fn deadlines_are_swept_without_a_timer_per_call() {
    // Holds every `get_by_seq` unanswered; a ping answers the held ones first (late),
    // then the ping.
    let mut held = Vec::new();
    let addr = scripted_server(
        handshake_ok,
        Box::new(move |request_id, kind| match kind {
            request::Kind::GetBySeq(_) => {
                held.push(request_id);
                Vec::new()
            }
            request::Kind::Ping(ping) => {
                let mut frames: Vec<v1::Frame> = held
                    .drain(..)
                    .map(|id| {
                        v1::Frame::response(
                            id,
                            response::Kind::GetBySeq(v1::GetBySeqResponse::default()),
                        )
                    })
                    .collect();
                frames.push(pong(request_id, ping.nonce));
                frames
            }
            other => panic!("unexpected {other:?}"),
        }),
    )
    .await;
    let timeout = Duration::from_millis(160);
    let period = sweep_period(timeout);
    let options = ClientOptions {
        request_timeout: timeout,
        requests_in_flight_max: 3,
        ..ClientOptions::default()
    };
    let client = within(Client::connect(&addr, options)).await.unwrap();
    for round in 0..2 {
        let started = tokio::time::Instant::now();
        let timed_out = within(client.get_by_seq(v1::GetBySeqRequest::default()))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(timed_out, ClientError::Timeout), "{timed_out}");
        assert!(
            took >= timeout,
            "round {round}: timed out early, after {took:?}"
        );
        // A sweep period late at most, plus generous room for a loaded host.
        assert!(
            took < timeout + period + Duration::from_millis(500),
            "round {round}: timed out late, after {took:?}"
        );
        // Let the sweep find nobody waiting and stop before the next round.
        tokio::time::sleep(period * 3).await;
    }
    // Both timed-out requests still hold their slots (2 of 3).
    let connection = client.live_connection().expect("connected");
    assert_eq!(connection.in_flight.available_permits(), 1);
    // The ping makes the server answer them (late), then the ping: the late answers
    // release their slots, and find no caller.
    let pong = within(client.ping(v1::PingRequest { nonce: 7 }))
        .await
        .unwrap();
    assert_eq!(pong.nonce, 7);
    assert_eq!(connection.in_flight.available_permits(), 3);
}
