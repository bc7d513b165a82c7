//! A media download answer framed as two buffers: the frame prefix and protobuf
//! envelope, then the chunk's bytes as they are (for a server, a slice of the mapped
//! file), so a server writes both with one `writev` instead of copying 512 KiB into a
//! frame buffer first.
//!
//! What it owns: the byte layout of such a frame and the pair assertion that it is the
//! length [`prost`] would give the same message. What it must not do: read files or
//! sockets, or know why the bytes are where they are.
//!
//! Layout (protobuf; `key(n, t)` is field `n`'s tag with wire type `t`, `varint` an
//! unsigned LEB128):
//!
//! ```text
//! head: len u32 LE (the frame prefix)
//!       | [request_id != 0] key(1, varint) varint(request_id)          Frame.request_id
//!       | key(3, bytes) varint(response_len)                           Frame.response
//!       | key(84, bytes) varint(answer_len)                            Response.media_download
//!       | MediaDownloadResponse without `data` (offset, crc32, size_bytes as prost encodes them)
//!       | key(2, bytes) varint(data.len())                             MediaDownloadResponse.data
//! tail: data
//! ```
//!
//! `data` (field 2) comes after fields 3 and 4 here, where prost would put it before
//! them. Protobuf decoders accept fields in any order (the language guide's encoding
//! rules: "fields can appear in any order"), so every client decodes the same message;
//! the payload has the same length as prost's encoding, which the encoder asserts.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::check_frame_len;
use crate::error::Result;
use crate::limits::FRAME_PREFIX_BYTES;
use crate::proto::v1;

/// Field numbers of the path to the data bytes (chatlog.proto).
const FRAME_REQUEST_ID: u32 = 1;
const FRAME_RESPONSE: u32 = 3;
const RESPONSE_MEDIA_DOWNLOAD: u32 = 84;
const MEDIA_DOWNLOAD_DATA: u32 = 2;

/// Bytes of the head before the answer's own fields: prefix, request id and two keys
/// with their lengths. Small: the head is a few dozen bytes.
const HEAD_BYTES_MAX: usize = FRAME_PREFIX_BYTES + 2 * (1 + 10) + 2 * (2 + 5) + 32;

/// Frames the response to `request_id` carrying `answer` as `(head, data)`: writing head
/// then data puts one frame on the stream that decodes to
/// `Frame::response(request_id, Kind::MediaDownload(answer))`. `data` is `answer.data`
/// itself (no copy). Fails like [`super::encode_message`] when the frame is over
/// `frame_bytes_max`.
pub fn media_download(
    request_id: u64,
    answer: &v1::MediaDownloadResponse,
    frame_bytes_max: u32,
) -> Result<(Bytes, Bytes)> {
    let data = answer.data.clone();
    let fields = v1::MediaDownloadResponse {
        data: Bytes::new(),
        ..answer.clone()
    };
    // An empty `data` is left out, as prost leaves out every default value.
    let data_field_len = if data.is_empty() {
        0
    } else {
        key_len(MEDIA_DOWNLOAD_DATA) + encoded_len_varint(data.len() as u64) + data.len()
    };
    let answer_len = fields.encoded_len() + data_field_len;
    let response_len =
        key_len(RESPONSE_MEDIA_DOWNLOAD) + encoded_len_varint(answer_len as u64) + answer_len;
    let request_id_len = if request_id == 0 {
        0
    } else {
        key_len(FRAME_REQUEST_ID) + encoded_len_varint(request_id)
    };
    let payload_len = request_id_len
        + key_len(FRAME_RESPONSE)
        + encoded_len_varint(response_len as u64)
        + response_len;
    let len = check_frame_len(payload_len as u64, frame_bytes_max)?;
    let mut head = BytesMut::with_capacity(HEAD_BYTES_MAX);
    head.put_u32_le(len as u32);
    if request_id != 0 {
        encode_key(FRAME_REQUEST_ID, WireType::Varint, &mut head);
        encode_varint(request_id, &mut head);
    }
    encode_key(FRAME_RESPONSE, WireType::LengthDelimited, &mut head);
    encode_varint(response_len as u64, &mut head);
    encode_key(
        RESPONSE_MEDIA_DOWNLOAD,
        WireType::LengthDelimited,
        &mut head,
    );
    encode_varint(answer_len as u64, &mut head);
    fields
        .encode(&mut head)
        .expect("a BytesMut grows as needed");
    if !data.is_empty() {
        encode_key(MEDIA_DOWNLOAD_DATA, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
    }
    // Pair assertions: the prefix must count exactly the bytes that follow it, or every
    // later frame on the stream is misread; prost's length of the same message (cheap:
    // no pass over the data) is the reference.
    assert_eq!(
        head.len() - FRAME_PREFIX_BYTES + data.len(),
        len,
        "the split frame's bytes disagree with its prefix"
    );
    let whole = v1::MediaDownloadResponse {
        data: data.clone(),
        ..fields
    };
    assert_eq!(
        len,
        v1::Frame::response(request_id, v1::response::Kind::MediaDownload(whole)).encoded_len(),
        "the split frame's length disagrees with prost's"
    );
    Ok((head.freeze(), data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_message, encode_message};

    fn answer(len: usize, offset: u64, crc32: u32, size_bytes: u64) -> v1::MediaDownloadResponse {
        v1::MediaDownloadResponse {
            offset,
            data: Bytes::from((0..len).map(|i| (i * 7) as u8).collect::<Vec<u8>>()),
            crc32,
            size_bytes,
        }
    }

    #[test]
    fn a_split_frame_decodes_to_the_same_message_with_the_same_length() {
        for (request_id, a) in [
            (1, answer(512 * 1024, 0, 0xdead_beef, 2 << 30)),
            (u64::MAX, answer(1, 1 << 40, 0, 1)),
            (0, answer(300, 7, 1, 307)),
            (77, answer(0, 0, 0, 0)),
            (128, answer(127, 0, u32::MAX, 0)),
        ] {
            let (head, data) = media_download(request_id, &a, 1 << 20).expect("fits");
            assert_eq!(data, a.data, "the data is the answer's own buffer");
            let mut whole = BytesMut::new();
            whole.extend_from_slice(&head);
            whole.extend_from_slice(&data);
            let mut reference = BytesMut::new();
            let frame = v1::Frame::response(request_id, v1::response::Kind::MediaDownload(a));
            encode_message(&frame, 1 << 20, &mut reference).expect("fits");
            assert_eq!(whole.len(), reference.len(), "same length as prost's");
            assert_eq!(whole[..4], reference[..4], "same prefix");
            let decoded: v1::Frame = decode_message(whole.freeze().slice(4..)).expect("decodes");
            assert_eq!(decoded, frame);
        }
    }

    #[test]
    fn a_split_frame_over_the_limit_is_refused() {
        assert!(media_download(1, &answer(2000, 0, 0, 2000), 1000).is_err());
    }
}
