//! Unit tests of the framing codec: round trips, every split of the input, limits checked
//! before allocation, garbage input, and the async helpers driven without a runtime.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use super::*;
use crate::limits::FRAME_BYTES_MAX;
use crate::proto::v1;

/// A small limit so that tests can build frames at and past it cheaply.
const TEST_FRAME_BYTES_MAX: u32 = 4096;

/// Payload lengths that cover the edges: 1 byte, around the prefix size, around a
/// varint boundary, and exactly the limit.
const EDGE_PAYLOAD_LENS: [usize; 9] =
    [1, 2, 3, 4, 5, 127, 128, 1000, TEST_FRAME_BYTES_MAX as usize];

fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn encode_all(payloads: &[Vec<u8>]) -> BytesMut {
    let mut stream = BytesMut::new();
    for payload in payloads {
        encode_payload(payload, TEST_FRAME_BYTES_MAX, &mut stream).unwrap();
    }
    stream
}

/// Feeds `pieces` in order and collects every payload, then checks the stream may end.
fn decode_pieces<'a>(
    decoder: &mut FrameDecoder,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Bytes>> {
    let mut frames = Vec::new();
    for piece in pieces {
        let mut input = piece;
        while let Some(frame) = decoder.decode(&mut input)? {
            frames.push(frame);
        }
        assert!(
            input.is_empty(),
            "decode returned None before consuming its input"
        );
    }
    decoder.finish()?;
    Ok(frames)
}

fn assert_frames_eq(frames: &[Bytes], payloads: &[Vec<u8>], context: &str) {
    assert_eq!(
        frames.len(),
        payloads.len(),
        "frame count differs: {context}"
    );
    for (index, (frame, payload)) in frames.iter().zip(payloads).enumerate() {
        assert_eq!(&frame[..], &payload[..], "frame {index} differs: {context}");
    }
}

/// SplitMix64: a tiny, well-mixed generator, so seeded tests need no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }
}

/// The seed for a random test: `CHATLOG_TEST_SEED` when set (to re-run a failure), else
/// the clock. Printed so that a failing run can be repeated.
fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("CHATLOG_TEST_SEED") {
        Ok(text) => text.parse().expect("CHATLOG_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed={seed} (re-run with CHATLOG_TEST_SEED={seed})");
    seed
}

#[test]
fn one_frame_round_trips() {
    let mut stream = BytesMut::new();
    encode_payload(b"hello", TEST_FRAME_BYTES_MAX, &mut stream).unwrap();
    assert_eq!(&stream[..], b"\x05\x00\x00\x00hello");

    let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
    let frames = decode_pieces(&mut decoder, [&stream[..]]).unwrap();
    assert_eq!(frames, [&b"hello"[..]]);
    assert_eq!(decoder.buffered_bytes(), 0);
}

#[test]
fn many_frames_in_one_input_round_trip() {
    let payloads: Vec<_> = EDGE_PAYLOAD_LENS
        .iter()
        .enumerate()
        .map(|(salt, &len)| payload(len, salt as u8))
        .collect();
    let stream = encode_all(&payloads);

    let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
    let frames = decode_pieces(&mut decoder, [&stream[..]]).unwrap();
    assert_frames_eq(&frames, &payloads, "one input");
}

#[test]
fn split_at_every_byte_boundary_gives_the_same_frames() {
    let payloads: Vec<_> = EDGE_PAYLOAD_LENS
        .iter()
        .enumerate()
        .map(|(salt, &len)| payload(len, salt as u8))
        .collect();
    let stream = encode_all(&payloads);

    for split in 0..=stream.len() {
        let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
        let (head, tail) = stream.split_at(split);
        let frames = decode_pieces(&mut decoder, [head, tail]).unwrap();
        assert_frames_eq(&frames, &payloads, &format!("split at {split}"));
    }

    let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
    let frames = decode_pieces(&mut decoder, stream.chunks(1)).unwrap();
    assert_frames_eq(&frames, &payloads, "one byte at a time");
}

#[test]
fn seeded_random_splits_give_the_same_frames() {
    let seed = test_seed("seeded_random_splits_give_the_same_frames");
    let mut rng = Rng(seed);
    for round in 0..200 {
        let frame_count = rng.range(1, 20);
        let payloads: Vec<_> = (0..frame_count)
            .map(|_| {
                let len = match rng.range(0, 9) {
                    0 => TEST_FRAME_BYTES_MAX as usize,
                    1 => rng.range(1, 8),
                    _ => rng.range(1, TEST_FRAME_BYTES_MAX as usize),
                };
                payload(len, rng.next_u64() as u8)
            })
            .collect();
        let stream = encode_all(&payloads);

        let mut pieces = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let take = match rng.range(0, 3) {
                0 => 0,
                1 => rng.range(1, 4),
                _ => rng.range(1, rest.len()),
            }
            .min(rest.len());
            let (piece, tail) = rest.split_at(take);
            pieces.push(piece);
            rest = tail;
        }

        let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
        let frames = decode_pieces(&mut decoder, pieces.iter().copied())
            .unwrap_or_else(|error| panic!("seed={seed} round={round}: {error}"));
        assert_frames_eq(&frames, &payloads, &format!("seed={seed} round={round}"));
    }
}

#[test]
fn oversize_prefix_is_rejected_before_allocating() {
    for announced in [TEST_FRAME_BYTES_MAX + 1, u32::MAX] {
        let mut stream = announced.to_le_bytes().to_vec();
        stream.extend_from_slice(&[0xAB; 64]);

        let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
        let mut input = &stream[..];
        let error = decoder.decode(&mut input).unwrap_err();
        assert!(
            matches!(error, Error::FrameTooLarge { len, max }
                if len == u64::from(announced) && max == TEST_FRAME_BYTES_MAX),
            "{error:?}"
        );
        // Nothing past the prefix was consumed, and no payload buffer exists.
        assert_eq!(input.len(), 64);
        assert!(matches!(decoder.state, DecoderState::Failed { .. }));
        assert_eq!(decoder.buffered_bytes(), 0);

        // The stream cannot be resynchronised: the error sticks.
        assert!(matches!(
            decoder.decode(&mut input),
            Err(Error::FrameTooLarge { .. })
        ));
        assert!(matches!(decoder.finish(), Err(Error::FrameTooLarge { .. })));
        assert_eq!(input.len(), 64);
    }
}

#[test]
fn prefix_at_the_limit_allocates_only_what_arrives() {
    let mut stream = FRAME_BYTES_MAX.to_le_bytes().to_vec();
    stream.extend_from_slice(&[7; 10]);

    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let mut input = &stream[..];
    assert!(decoder.decode(&mut input).unwrap().is_none());
    match &decoder.state {
        DecoderState::Payload { payload, len } => {
            assert_eq!(*len, FRAME_BYTES_MAX as usize);
            assert_eq!(payload.len(), 10);
            assert!(payload.capacity() < 1024, "capacity {}", payload.capacity());
        }
        other => panic!("expected a payload in progress, got {other:?}"),
    }
    assert_eq!(decoder.buffered_bytes(), 14);
}

#[test]
fn buffer_never_exceeds_the_frame_while_trickling() {
    let payload = payload(TEST_FRAME_BYTES_MAX as usize, 9);
    let stream = encode_all(std::slice::from_ref(&payload));
    let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
    let mut frames = Vec::new();
    for piece in stream.chunks(7) {
        let mut input = piece;
        while let Some(frame) = decoder.decode(&mut input).unwrap() {
            frames.push(frame);
        }
        if let DecoderState::Payload { payload, len } = &decoder.state {
            assert!(payload.capacity() <= *len);
        }
        assert!(decoder.buffered_bytes() <= FRAME_PREFIX_BYTES + TEST_FRAME_BYTES_MAX as usize);
    }
    assert_frames_eq(&frames, &[payload], "seven bytes at a time");
}

#[test]
fn zero_length_prefix_is_rejected() {
    let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
    let mut input = &[0u8, 0, 0, 0, 1, 2, 3][..];
    assert!(matches!(decoder.decode(&mut input), Err(Error::EmptyFrame)));
    assert_eq!(input, [1, 2, 3]);
    assert!(matches!(decoder.decode(&mut input), Err(Error::EmptyFrame)));
    assert!(matches!(decoder.finish(), Err(Error::EmptyFrame)));
}

#[test]
fn well_known_garbage_gives_a_clean_error() {
    // Someone speaking HTTP or TLS to the port: the first four bytes read as a huge length.
    let http = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let tls_client_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for garbage in [&http[..], &tls_client_hello[..]] {
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut input = garbage;
        let error = decoder.decode(&mut input).unwrap_err();
        assert!(matches!(error, Error::FrameTooLarge { .. }), "{error:?}");
        assert_eq!(error.protocol_code(), v1::ErrorCode::TooLarge);
    }

    // A valid prefix around bytes that are not a protobuf message.
    let mut stream = BytesMut::new();
    encode_payload(&[0xFF; 12], FRAME_BYTES_MAX, &mut stream).unwrap();
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let mut input = &stream[..];
    let payload = decoder.decode(&mut input).unwrap().unwrap();
    let error = decode_message::<v1::Frame>(payload).unwrap_err();
    assert!(
        matches!(error, Error::Decode { message_type, .. } if message_type.ends_with("Frame")),
        "{error:?}"
    );
    assert_eq!(error.protocol_code(), v1::ErrorCode::BadRequest);
}

#[test]
fn seeded_random_garbage_never_panics_and_never_overreads() {
    let seed = test_seed("seeded_random_garbage_never_panics_and_never_overreads");
    let mut rng = Rng(seed);
    for round in 0..2_000 {
        let len = rng.range(0, 64);
        let garbage: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
        let mut input = &garbage[..];
        let mut consumed_by_frames = 0;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => {
                    consumed_by_frames += FRAME_PREFIX_BYTES + frame.len();
                    // Whatever the bytes, a payload is either a message or a clean error.
                    let _ = decode_message::<v1::Frame>(frame);
                }
                Ok(None) => break,
                Err(Error::FrameTooLarge { .. } | Error::EmptyFrame) => break,
                Err(error) => panic!("seed={seed} round={round}: unexpected {error:?}"),
            }
        }
        assert!(
            consumed_by_frames + decoder.buffered_bytes() <= garbage.len(),
            "seed={seed} round={round}"
        );
    }
}

#[test]
fn finish_reports_a_stream_cut_inside_a_frame() {
    let stream = encode_all(&[payload(10, 1)]);
    for cut in 1..stream.len() {
        let mut decoder = FrameDecoder::new(TEST_FRAME_BYTES_MAX);
        let error = decode_pieces(&mut decoder, [&stream[..cut]]).unwrap_err();
        let expected = if cut < FRAME_PREFIX_BYTES {
            FRAME_PREFIX_BYTES
        } else {
            stream.len()
        };
        assert!(
            matches!(error, Error::TruncatedFrame { expected: e, received: r }
                if e == expected as u64 && r == cut as u64),
            "cut at {cut}: {error:?}"
        );
    }
}

#[test]
fn encoders_reject_empty_and_oversize_frames_without_writing() {
    let mut stream = BytesMut::from(&b"kept"[..]);
    assert!(matches!(
        encode_payload(b"", TEST_FRAME_BYTES_MAX, &mut stream),
        Err(Error::EmptyFrame)
    ));
    let too_big = vec![0; TEST_FRAME_BYTES_MAX as usize + 1];
    assert!(matches!(
        encode_payload(&too_big, TEST_FRAME_BYTES_MAX, &mut stream),
        Err(Error::FrameTooLarge { len, max: TEST_FRAME_BYTES_MAX }) if len == too_big.len() as u64
    ));

    // A message with every field at its default encodes to nothing.
    assert!(matches!(
        encode_message(&v1::Frame::default(), TEST_FRAME_BYTES_MAX, &mut stream),
        Err(Error::EmptyFrame)
    ));
    let long_text = v1::SendMessageRequest {
        chat_id: 1,
        client_message_id: 1,
        text: "x".repeat(TEST_FRAME_BYTES_MAX as usize),
        ..Default::default()
    };
    let frame = v1::Frame::request(1, v1::request::Kind::SendMessage(long_text));
    assert!(matches!(
        encode_message(&frame, TEST_FRAME_BYTES_MAX, &mut stream),
        Err(Error::FrameTooLarge { .. })
    ));
    assert_eq!(&stream[..], b"kept");
}

#[test]
fn messages_round_trip_through_the_decoder() {
    let frames = [
        v1::Frame::request(
            1,
            v1::request::Kind::Handshake(v1::Handshake {
                protocol_version: 1,
                client_name: "test".into(),
                session_token: String::new(),
                no_live_pushes: false,
            }),
        ),
        v1::Frame::response(
            1,
            v1::response::Kind::Error(v1::Error::new(v1::ErrorCode::NotFound, "no chat 9")),
        ),
        v1::Frame::push(
            0,
            v1::push::Kind::Disconnect(v1::Disconnect {
                reason: Some(v1::Error::new(v1::ErrorCode::Timeout, "idle")),
            }),
        ),
    ];
    let mut stream = BytesMut::new();
    for frame in &frames {
        encode_message(frame, FRAME_BYTES_MAX, &mut stream).unwrap();
    }
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let payloads = decode_pieces(&mut decoder, stream.chunks(3)).unwrap();
    let decoded: Vec<v1::Frame> = payloads
        .into_iter()
        .map(|payload| decode_message(payload).unwrap())
        .collect();
    assert_eq!(decoded, frames);
}

// ---- async helpers, polled without a runtime ------------------------------------------

/// Polls `future` to completion with a waker that does nothing. Enough for the readers
/// and writers below, which never wait on anything outside themselves.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    for _ in 0..10_000_000 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
    }
    panic!("future made no progress");
}

/// A reader that hands out at most `chunk_bytes` per read and is not ready every other
/// time it is polled, like a slow socket.
struct Trickle<'a> {
    data: &'a [u8],
    chunk_bytes: usize,
    ready: bool,
}

impl<'a> Trickle<'a> {
    fn new(data: &'a [u8], chunk_bytes: usize) -> Self {
        Trickle {
            data,
            chunk_bytes,
            ready: false,
        }
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.ready {
            self.ready = true;
            context.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        let take = self.chunk_bytes.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(take);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

#[test]
fn async_write_then_read_round_trips() {
    let payloads: Vec<_> = EDGE_PAYLOAD_LENS
        .iter()
        .enumerate()
        .map(|(salt, &len)| payload(len, salt as u8))
        .collect();
    let mut stream: Vec<u8> = Vec::new();
    for payload in &payloads {
        block_on(write_frame(&mut stream, payload, TEST_FRAME_BYTES_MAX)).unwrap();
    }
    assert_eq!(stream, &encode_all(&payloads)[..]);

    for chunk_bytes in [1, 3, 4096] {
        let mut reader = Trickle::new(&stream, chunk_bytes);
        let mut frames = Vec::new();
        while let Some(frame) = block_on(read_frame(&mut reader, TEST_FRAME_BYTES_MAX)).unwrap() {
            frames.push(frame);
        }
        assert_frames_eq(&frames, &payloads, &format!("chunks of {chunk_bytes}"));
    }
}

#[test]
fn async_read_grows_its_buffer_to_a_large_frame() {
    let len = 3 * PAYLOAD_CHUNK_BYTES + 17;
    let payload = payload(len, 5);
    let mut stream = BytesMut::new();
    encode_payload(&payload, FRAME_BYTES_MAX, &mut stream).unwrap();
    let mut reader = Trickle::new(&stream, 1000);
    let frame = block_on(read_frame(&mut reader, FRAME_BYTES_MAX))
        .unwrap()
        .unwrap();
    assert_eq!(&frame[..], &payload[..]);
    assert!(
        block_on(read_frame(&mut reader, FRAME_BYTES_MAX))
            .unwrap()
            .is_none()
    );
}

#[test]
fn async_messages_round_trip() {
    let frame = v1::Frame::request(42, v1::request::Kind::Ping(v1::PingRequest { nonce: 7 }));
    let mut stream: Vec<u8> = Vec::new();
    block_on(write_message(&mut stream, &frame, FRAME_BYTES_MAX)).unwrap();
    let mut reader = Trickle::new(&stream, 2);
    let decoded: v1::Frame = block_on(read_message(&mut reader, FRAME_BYTES_MAX))
        .unwrap()
        .unwrap();
    assert_eq!(decoded, frame);
    let end: Option<v1::Frame> = block_on(read_message(&mut reader, FRAME_BYTES_MAX)).unwrap();
    assert!(end.is_none());
}

#[test]
fn async_read_reports_truncation_and_clean_end() {
    let stream = encode_all(&[payload(10, 3)]);
    let mut reader = &stream[..0];
    assert!(
        block_on(read_frame(&mut reader, TEST_FRAME_BYTES_MAX))
            .unwrap()
            .is_none()
    );

    for cut in 1..stream.len() {
        let mut reader = Trickle::new(&stream[..cut], 2);
        let error = block_on(read_frame(&mut reader, TEST_FRAME_BYTES_MAX)).unwrap_err();
        let expected = if cut < FRAME_PREFIX_BYTES {
            FRAME_PREFIX_BYTES
        } else {
            stream.len()
        };
        assert!(
            matches!(error, Error::TruncatedFrame { expected: e, received: r }
                if e == expected as u64 && r == cut as u64),
            "cut at {cut}: {error:?}"
        );
    }
}

#[test]
fn async_read_rejects_bad_prefixes_without_reading_further() {
    for (prefix, zero) in [(TEST_FRAME_BYTES_MAX + 1, false), (0, true)] {
        let mut stream = prefix.to_le_bytes().to_vec();
        stream.extend_from_slice(&[1; 32]);
        let mut reader = &stream[..];
        let error = block_on(read_frame(&mut reader, TEST_FRAME_BYTES_MAX)).unwrap_err();
        if zero {
            assert!(matches!(error, Error::EmptyFrame), "{error:?}");
        } else {
            assert!(matches!(error, Error::FrameTooLarge { .. }), "{error:?}");
        }
        assert_eq!(reader.len(), 32, "read past the prefix");
    }
}

#[test]
fn async_write_rejects_oversize_without_writing() {
    let mut stream: Vec<u8> = Vec::new();
    let too_big = vec![0; TEST_FRAME_BYTES_MAX as usize + 1];
    let error = block_on(write_frame(&mut stream, &too_big, TEST_FRAME_BYTES_MAX)).unwrap_err();
    assert!(matches!(error, Error::FrameTooLarge { .. }), "{error:?}");
    assert!(stream.is_empty());
}

/// A reader that fails the way a reset connection does.
struct Broken;

impl AsyncRead for Broken {
    fn poll_read(
        self: Pin<&mut Self>,
        _context: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
    }
}

#[test]
fn async_read_reports_io_errors_with_what_was_being_done() {
    let error = block_on(read_frame(&mut Broken, TEST_FRAME_BYTES_MAX)).unwrap_err();
    assert!(
        matches!(&error, Error::Io { action: "reading", source }
            if source.kind() == io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
    assert_eq!(error.protocol_code(), v1::ErrorCode::Internal);
}
