//! Tests that pin the protocol's encoding (so a careless edit of a `.proto` file that
//! would break existing clients fails here) and check the limits against real messages.

use bytes::{Bytes, BytesMut};
use prost::Message;

use super::node;
use super::v1;
use crate::frame::{decode_message, encode_message};
use crate::limits::{
    EVENT_OVERHEAD_BYTES_MAX, FRAME_BYTES_MAX, MEDIA_FILE_NAME_BYTES_MAX,
    MEDIA_MIME_TYPE_BYTES_MAX, MEDIA_SHA256_BYTES, NODE_FRAME_BYTES_MAX, PROTOCOL_VERSION,
    TEXT_BYTES_MAX,
};

/// The bytes of a whole frame, prefix included, for `frame`.
fn frame_bytes<M: Message>(frame: &M, frame_bytes_max: u32) -> Vec<u8> {
    let mut stream = BytesMut::new();
    encode_message(frame, frame_bytes_max, &mut stream).unwrap();
    stream.to_vec()
}

/// The worked example in PROTOCOL.md: a handshake and its answer, byte by byte.
#[test]
fn handshake_encoding_matches_protocol_md() {
    let handshake = v1::Frame::request(
        1,
        v1::request::Kind::Handshake(v1::Handshake {
            protocol_version: PROTOCOL_VERSION,
            client_name: "cli".into(),
            session_token: String::new(),
            no_live_pushes: false,
        }),
    );
    assert_eq!(
        frame_bytes(&handshake, FRAME_BYTES_MAX),
        [
            0x0d, 0x00, 0x00, 0x00, // length 13, little-endian
            0x08, 0x01, // Frame.request_id = 1
            0x12, 0x09, // Frame.request, 9 bytes
            0x0a, 0x07, // Request.handshake, 7 bytes
            0x08, 0x01, // Handshake.protocol_version = 1
            0x12, 0x03, b'c', b'l', b'i', // Handshake.client_name = "cli"
        ]
    );

    let handshake_ok = v1::Frame::response(
        1,
        v1::response::Kind::HandshakeOk(v1::HandshakeOk {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        }),
    );
    assert_eq!(
        frame_bytes(&handshake_ok, FRAME_BYTES_MAX),
        [
            0x08, 0x00, 0x00, 0x00, // length 8
            0x08, 0x01, // Frame.request_id = 1
            0x1a, 0x04, // Frame.response, 4 bytes
            0x0a, 0x02, // Response.handshake_ok, 2 bytes
            0x08, 0x01, // HandshakeOk.protocol_version = 1
        ]
    );
}

/// Error codes are part of the protocol: clients in other languages switch on these
/// numbers, so they may be added to but never renumbered.
#[test]
fn error_code_numbers_are_stable() {
    use v1::ErrorCode::*;
    let expected = [
        (Unspecified, 0, "ERROR_CODE_UNSPECIFIED"),
        (BadRequest, 1, "ERROR_CODE_BAD_REQUEST"),
        (UnsupportedVersion, 2, "ERROR_CODE_UNSUPPORTED_VERSION"),
        (UnknownRequest, 3, "ERROR_CODE_UNKNOWN_REQUEST"),
        (Unauthenticated, 4, "ERROR_CODE_UNAUTHENTICATED"),
        (PermissionDenied, 5, "ERROR_CODE_PERMISSION_DENIED"),
        (NotFound, 6, "ERROR_CODE_NOT_FOUND"),
        (Conflict, 7, "ERROR_CODE_CONFLICT"),
        (RateLimited, 8, "ERROR_CODE_RATE_LIMITED"),
        (TooLarge, 9, "ERROR_CODE_TOO_LARGE"),
        (Unavailable, 10, "ERROR_CODE_UNAVAILABLE"),
        (Timeout, 11, "ERROR_CODE_TIMEOUT"),
        (Internal, 12, "ERROR_CODE_INTERNAL"),
    ];
    for (code, number, name) in expected {
        assert_eq!(code as i32, number, "{name}");
        assert_eq!(code.as_str_name(), name);
    }
    assert!(
        v1::ErrorCode::try_from(13).is_err(),
        "a new code needs a row above and in PROTOCOL.md"
    );
}

/// A request kind this server does not know (a newer client) decodes as an empty oneof,
/// which the server answers with ERROR_CODE_UNKNOWN_REQUEST instead of dropping the
/// connection. Field 99 stands for a request added in a later version.
#[test]
fn unknown_request_kind_decodes_as_an_empty_request() {
    let unknown_request = [0x9a, 0x06, 0x00]; // field 99, length-delimited, 0 bytes
    let request = v1::Request::decode(&unknown_request[..]).unwrap();
    assert_eq!(request.kind, None);

    let mut frame = vec![0x08, 0x05, 0x12, unknown_request.len() as u8];
    frame.extend_from_slice(&unknown_request);
    let frame: v1::Frame = decode_message(Bytes::from(frame)).unwrap();
    assert_eq!(frame.request_id, 5);
    assert_eq!(
        frame.body,
        Some(v1::frame::Body::Request(v1::Request { kind: None }))
    );
}

fn largest_media() -> v1::MediaRef {
    v1::MediaRef {
        sha256: Bytes::from(vec![0xEE; MEDIA_SHA256_BYTES]),
        size_bytes: u64::MAX,
        mime_type: "m".repeat(MEDIA_MIME_TYPE_BYTES_MAX as usize),
        file_name: "f".repeat(MEDIA_FILE_NAME_BYTES_MAX as usize),
    }
}

/// The bytes of `frame` that are not text or file name: what EVENT_OVERHEAD_BYTES_MAX
/// must cover.
fn overhead_bytes(frame: &v1::Frame) -> u32 {
    let len = frame.encoded_len() as u32;
    len - TEXT_BYTES_MAX - MEDIA_FILE_NAME_BYTES_MAX
}

#[test]
fn largest_send_request_fits_in_a_client_frame() {
    let request = v1::SendMessageRequest {
        chat_id: u64::MAX,
        client_message_id: u64::MAX,
        text: "t".repeat(TEXT_BYTES_MAX as usize),
        media: Some(largest_media()),
        reply_to_seq: u64::MAX,
    };
    let frame = v1::Frame::request(u64::MAX, v1::request::Kind::SendMessage(request));
    let overhead = overhead_bytes(&frame);
    assert!(
        overhead < 1024,
        "overhead {overhead} bytes; the limits module claims < 1 KiB"
    );
    assert!(overhead <= EVENT_OVERHEAD_BYTES_MAX);
    frame_bytes(&frame, FRAME_BYTES_MAX);
}

#[test]
fn largest_event_fits_in_a_client_frame() {
    let event = v1::Event {
        chat_id: u64::MAX,
        seq: u64::MAX,
        sender_id: u64::MAX,
        timestamp_ms: u64::MAX,
        body: Some(v1::event::Body::MessagePosted(v1::MessagePosted {
            client_message_id: u64::MAX,
            text: "t".repeat(TEXT_BYTES_MAX as usize),
            media: Some(largest_media()),
            reply_to_seq: u64::MAX,
            erased: true,
        })),
    };
    // As a one-event history page, the largest response that carries it.
    let page = v1::HistoryResponse {
        events: vec![event],
        head_seq: u64::MAX,
        has_more: true,
    };
    let frame = v1::Frame::response(u64::MAX, v1::response::Kind::History(page));
    let overhead = overhead_bytes(&frame);
    assert!(
        overhead < 1024,
        "overhead {overhead} bytes; the limits module claims < 1 KiB"
    );
    assert!(overhead <= EVENT_OVERHEAD_BYTES_MAX);
    frame_bytes(&frame, FRAME_BYTES_MAX);
}

#[test]
fn largest_client_frame_fits_in_a_node_frame() {
    let frame = node::v1::NodeFrame {
        cluster_id: u64::MAX,
        from_node_id: u64::MAX,
        to_node_id: u64::MAX,
        group_id: u64::MAX,
        request_id: u64::MAX,
        payload: Some(node::v1::node_frame::Payload::AppendEntriesRequest(
            Bytes::from(vec![0; FRAME_BYTES_MAX as usize]),
        )),
    };
    frame_bytes(&frame, NODE_FRAME_BYTES_MAX);
}

#[test]
fn node_frame_payload_shares_the_frame_buffer() {
    let frame = node::v1::NodeFrame {
        cluster_id: 1,
        from_node_id: 2,
        to_node_id: 3,
        group_id: 4,
        request_id: 5,
        payload: Some(node::v1::node_frame::Payload::VoteRequest(
            Bytes::from_static(b"opaque raft bytes"),
        )),
    };
    let encoded = Bytes::from(frame.encode_to_vec());
    let decoded: node::v1::NodeFrame = decode_message(encoded.clone()).unwrap();
    assert_eq!(decoded, frame);
    let Some(node::v1::node_frame::Payload::VoteRequest(payload)) = decoded.payload else {
        panic!("lost the payload");
    };
    // Zero-copy: the decoded payload points into the frame's buffer.
    let range = encoded.as_ptr_range();
    assert!(range.contains(&payload.as_ptr()));
}

#[test]
fn event_kind_names_are_those_scripts_rely_on() {
    let message = v1::Event {
        body: Some(v1::event::Body::MessagePosted(v1::MessagePosted::default())),
        ..Default::default()
    };
    assert_eq!(message.kind_name(), "message");
    let edit = v1::Event {
        body: Some(v1::event::Body::MessageEdited(v1::MessageEdited::default())),
        ..Default::default()
    };
    assert_eq!(edit.kind_name(), "edit");
    assert_eq!(v1::Event::default().kind_name(), "unknown");
}
