//! Encodes a request frame from a borrowed request, so that [`super::Client::call`]
//! keeps its request for a retry without copying it per attempt.
//!
//! What it owns: the bytes of one `Frame { request_id, request: Request { kind } }`,
//! written field by field with prost's encoding helpers around the generated
//! `request::Kind::encode`, identical to what prost writes for the owned message (a
//! test compares them). What it must not do: know any request kind, or frame anything
//! but a client request.

use bytes::{BufMut, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::frame::check_frame_len;
use crate::limits::FRAME_PREFIX_BYTES;
use crate::proto::v1::request;

/// `Frame.request_id`'s field number (`proto/chatlog.proto`).
const FRAME_REQUEST_ID_FIELD: u32 = 1;
/// `Frame.request`'s field number (`proto/chatlog.proto`, the `body` oneof).
const FRAME_REQUEST_FIELD: u32 = 2;

/// Appends one frame carrying request `kind` with id `request_id` to `dst`: the same
/// bytes as `encode_message(&Frame::request(request_id, kind.clone()), ..)`, without
/// the clone. Fails as `encode_message` does, leaving `dst` untouched, when the frame
/// is over `frame_bytes_max`.
pub(crate) fn encode_request(
    request_id: u64,
    kind: &request::Kind,
    frame_bytes_max: u32,
    dst: &mut BytesMut,
) -> crate::Result<()> {
    // `Request { kind }`: the oneof's field alone.
    let request_len = kind.encoded_len();
    let id_len = if request_id != 0 {
        key_len(FRAME_REQUEST_ID_FIELD) + encoded_len_varint(request_id)
    } else {
        0
    };
    let len = id_len
        + key_len(FRAME_REQUEST_FIELD)
        + encoded_len_varint(request_len as u64)
        + request_len;
    let len = check_frame_len(len as u64, frame_bytes_max)?;
    let start = dst.len();
    dst.reserve(FRAME_PREFIX_BYTES + len);
    dst.put_u32_le(u32::try_from(len).expect("checked against a u32 limit"));
    if request_id != 0 {
        encode_key(FRAME_REQUEST_ID_FIELD, WireType::Varint, dst);
        encode_varint(request_id, dst);
    }
    encode_key(FRAME_REQUEST_FIELD, WireType::LengthDelimited, dst);
    encode_varint(request_len as u64, dst);
    kind.encode(dst);
    // Pair assertion, as in `encode_message`: the prefix must match what follows.
    assert_eq!(
        dst.len() - start,
        FRAME_PREFIX_BYTES + len,
        "encoded_len disagrees with encode"
    );
    Ok(())
}

/// The Request oneof's field number of `media_upload_part` (`proto/chatlog.proto`).
const REQUEST_MEDIA_UPLOAD_PART_FIELD: u32 = 81;
/// `MediaUploadPartRequest.data`'s field number: its last field, so prost writes it last.
const MEDIA_UPLOAD_PART_DATA_FIELD: u32 = 4;

/// [`encode_request`] as `(head, tail)`: writing `head` then `tail` puts the same bytes
/// on the stream. For `media_upload_part`, `tail` is the part's own buffer (shared, no
/// copy) and `head` the few dozen bytes before it; for every other kind `tail` is empty.
///
/// The layout is prost's own, not a reordering: `data` is `MediaUploadPartRequest`'s
/// last field (4), so prost writes it after fields 1 to 3; the head is prost's encoding
/// up to `data`'s length, which a test compares byte for byte.
pub(crate) fn encode_request_split(
    request_id: u64,
    kind: &request::Kind,
    frame_bytes_max: u32,
) -> crate::Result<(bytes::Bytes, bytes::Bytes)> {
    use prost::Message;
    let request::Kind::MediaUploadPart(part) = kind else {
        let mut dst = BytesMut::new();
        encode_request(request_id, kind, frame_bytes_max, &mut dst)?;
        return Ok((dst.freeze(), bytes::Bytes::new()));
    };
    if part.data.is_empty() {
        let mut dst = BytesMut::new();
        encode_request(request_id, kind, frame_bytes_max, &mut dst)?;
        return Ok((dst.freeze(), bytes::Bytes::new()));
    }
    let part_len = part.encoded_len();
    let request_len = kind.encoded_len();
    let id_len = if request_id != 0 {
        key_len(FRAME_REQUEST_ID_FIELD) + encoded_len_varint(request_id)
    } else {
        0
    };
    let len = id_len
        + key_len(FRAME_REQUEST_FIELD)
        + encoded_len_varint(request_len as u64)
        + request_len;
    let len = check_frame_len(len as u64, frame_bytes_max)?;
    let data = part.data.clone();
    let mut head = BytesMut::with_capacity(FRAME_PREFIX_BYTES + len - data.len());
    head.put_u32_le(u32::try_from(len).expect("checked against a u32 limit"));
    if request_id != 0 {
        encode_key(FRAME_REQUEST_ID_FIELD, WireType::Varint, &mut head);
        encode_varint(request_id, &mut head);
    }
    encode_key(FRAME_REQUEST_FIELD, WireType::LengthDelimited, &mut head);
    encode_varint(request_len as u64, &mut head);
    encode_key(
        REQUEST_MEDIA_UPLOAD_PART_FIELD,
        WireType::LengthDelimited,
        &mut head,
    );
    encode_varint(part_len as u64, &mut head);
    crate::proto::v1::MediaUploadPartRequest {
        data: bytes::Bytes::new(),
        ..part.clone()
    }
    .encode_raw(&mut head);
    encode_key(
        MEDIA_UPLOAD_PART_DATA_FIELD,
        WireType::LengthDelimited,
        &mut head,
    );
    encode_varint(data.len() as u64, &mut head);
    // Pair assertion: the prefix must match what follows.
    assert_eq!(
        head.len() + data.len(),
        FRAME_PREFIX_BYTES + len,
        "encoded_len disagrees with the split encoding"
    );
    Ok((head.freeze(), data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_message;
    use crate::limits::FRAME_BYTES_MAX;
    use crate::proto::v1;

    fn owned(request_id: u64, kind: &request::Kind, max: u32) -> crate::Result<BytesMut> {
        let mut dst = BytesMut::new();
        encode_message(&v1::Frame::request(request_id, kind.clone()), max, &mut dst)?;
        Ok(dst)
    }

    /// Byte for byte what prost writes for the owned frame, for request kinds with
    /// strings, nested messages, bytes, default-valued fields and large ids.
    #[test]
    fn a_borrowed_request_encodes_as_the_owned_frame() {
        let kinds = [
            request::Kind::SendMessage(v1::SendMessageRequest {
                chat_id: 1 << 16 | 7,
                client_message_id: u64::MAX,
                text: "héllo ".repeat(50),
                media: None,
                reply_to_seq: 3,
            }),
            request::Kind::SendMessage(v1::SendMessageRequest::default()),
            request::Kind::Ping(v1::PingRequest { nonce: 0 }),
            request::Kind::Login(v1::LoginRequest {
                user_id: 9,
                login_token: "ab".repeat(32),
                device_id: "d".into(),
                device_name: String::new(),
            }),
            request::Kind::MediaUploadPart(v1::MediaUploadPartRequest {
                upload_id: 5,
                part_index: 2,
                crc32: 0,
                data: bytes::Bytes::from(vec![7u8; 70_000]),
            }),
        ];
        for kind in &kinds {
            for request_id in [1, 2, 127, 128, 300, u64::MAX] {
                let mut borrowed = BytesMut::new();
                encode_request(request_id, kind, FRAME_BYTES_MAX, &mut borrowed).unwrap();
                let owned = owned(request_id, kind, FRAME_BYTES_MAX).unwrap();
                assert_eq!(borrowed, owned, "request id {request_id}, {kind:?}");
                // Split (a part's bytes in their own buffer): the same bytes in order.
                let (head, tail) = encode_request_split(request_id, kind, FRAME_BYTES_MAX).unwrap();
                assert_eq!(
                    [&head[..], &tail[..]].concat(),
                    &owned[..],
                    "split {request_id}"
                );
                if let request::Kind::MediaUploadPart(p) = kind {
                    assert_eq!(tail.as_ptr(), p.data.as_ptr(), "the part is not copied");
                } else {
                    assert!(tail.is_empty());
                }
                // And it decodes back to the request.
                let frame: v1::Frame =
                    crate::frame::decode_message(borrowed.split_off(4).freeze()).unwrap();
                assert_eq!(frame, v1::Frame::request(request_id, kind.clone()));
            }
        }
    }

    /// Over the limit: the same error as the owned path, and nothing appended.
    #[test]
    fn an_oversize_request_is_refused_and_leaves_the_buffer_alone() {
        let kind = request::Kind::SendMessage(v1::SendMessageRequest {
            text: "x".repeat(1000),
            ..Default::default()
        });
        let mut dst = BytesMut::from(&b"kept"[..]);
        let error = encode_request(1, &kind, 100, &mut dst).unwrap_err();
        assert!(
            matches!(error, crate::Error::FrameTooLarge { max: 100, .. }),
            "{error}"
        );
        assert_eq!(&dst[..], b"kept");
        assert!(owned(1, &kind, 100).is_err());
        let part = request::Kind::MediaUploadPart(v1::MediaUploadPartRequest {
            data: bytes::Bytes::from(vec![1u8; 1000]),
            ..Default::default()
        });
        assert!(matches!(
            encode_request_split(1, &part, 100),
            Err(crate::Error::FrameTooLarge { max: 100, .. })
        ));
    }
}
