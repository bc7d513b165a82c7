//! Length-prefixed framing of protocol messages on a byte stream (TCP).
//!
//! Format of one frame:
//!
//! ```text
//! offset  size  field
//! 0       4     len      u32, little-endian: payload length; 1 <= len <= frame_bytes_max
//! 4       len   payload  one protobuf-encoded message (chatlog.v1.Frame or
//!                        chatlog.node.v1.NodeFrame)
//! ```
//!
//! Frames follow each other with nothing in between. There is no magic number and no
//! checksum: TCP already checks its bytes, and the handshake that must come first checks
//! that the peer speaks this protocol.
//!
//! This module owns that byte format and its limit check, which always runs on the
//! prefix before any buffer is sized from it. It offers a pure incremental decoder
//! ([`FrameDecoder`]), encoders into a [`BytesMut`], and async helpers for tokio streams.
//! It must not know what a payload means: callers name the message type to decode, and
//! the limit, since client and node connections have different ones
//! ([`crate::limits::FRAME_BYTES_MAX`], [`crate::limits::NODE_FRAME_BYTES_MAX`]).

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::limits::FRAME_PREFIX_BYTES;

/// Media download answers framed as head + data, for a vectored write (`split.rs`).
pub mod split;

/// First buffer size for a payload that [`read_frame`] is still receiving, in bytes;
/// the buffer then doubles as bytes arrive, up to the frame's length.
///
/// Why: a peer that sends a prefix announcing a large frame and then stalls should cost
/// memory in proportion to what it has sent, not to what it claims. 64 KiB holds every
/// typical frame (messages are ~500 bytes) in one allocation.
const PAYLOAD_CHUNK_BYTES: usize = 64 * 1024;

/// How much a large payload's buffer in [`FrameDecoder`] grows when bytes arrive past
/// its capacity: to this many times its capacity (never past the frame's length).
///
/// Why: every growth copies what was received so far. Doubling from 16 KiB copied
/// 496 KiB for each 512 KiB media part, nearly a second copy of every uploaded byte
/// (`perf`, session 9: 2–3% of the server's upload CPU in `realloc`); growing eightfold
/// copies 16 + 128 KiB. A stalled peer still holds at most 8 × (what it sent + 16 KiB),
/// and never more than one frame's limit.
const PAYLOAD_GROWTH: usize = 8;

/// Checks a frame's payload length against the limit and returns it as a `usize`.
///
/// Every path that reads a prefix or writes a frame calls this before it allocates or
/// writes anything.
pub fn check_frame_len(len: u64, frame_bytes_max: u32) -> Result<usize> {
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    if len > u64::from(frame_bytes_max) {
        return Err(Error::FrameTooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    // Cannot fail: len <= frame_bytes_max, a u32, and usize is at least 32 bits here.
    Ok(usize::try_from(len).expect("a u32 length fits in usize"))
}

/// Appends one frame holding `payload` to `dst`.
///
/// Fails with [`Error::EmptyFrame`] or [`Error::FrameTooLarge`], leaving `dst` untouched,
/// when the payload's length is 0 or above `frame_bytes_max`.
pub fn encode_payload(payload: &[u8], frame_bytes_max: u32, dst: &mut BytesMut) -> Result<()> {
    let len = check_frame_len(payload.len() as u64, frame_bytes_max)?;
    dst.reserve(FRAME_PREFIX_BYTES + len);
    put_prefix(dst, len);
    dst.put_slice(payload);
    Ok(())
}

/// Appends one frame holding `message`, encoded, to `dst`.
///
/// Fails with [`Error::EmptyFrame`] or [`Error::FrameTooLarge`], leaving `dst` untouched,
/// when the encoded message is empty (a message with every field at its default) or
/// longer than `frame_bytes_max`.
pub fn encode_message<M: Message>(
    message: &M,
    frame_bytes_max: u32,
    dst: &mut BytesMut,
) -> Result<()> {
    let len = check_frame_len(message.encoded_len() as u64, frame_bytes_max)?;
    let start = dst.len();
    dst.reserve(FRAME_PREFIX_BYTES + len);
    put_prefix(dst, len);
    message
        .encode(dst)
        .expect("a BytesMut with room reserved never runs out of space");
    // Pair assertion: the prefix written must match the bytes that follow it, or every
    // later frame on the stream would be misread.
    assert_eq!(
        dst.len() - start,
        FRAME_PREFIX_BYTES + len,
        "encoded_len disagrees with encode"
    );
    Ok(())
}

/// Decodes one frame's payload as message type `M`.
///
/// `payload` is a [`Bytes`] so that `bytes` fields of the message share its buffer
/// instead of being copied.
pub fn decode_message<M: Message + Default>(payload: Bytes) -> Result<M> {
    M::decode(payload).map_err(|source| Error::Decode {
        message_type: std::any::type_name::<M>(),
        source,
    })
}

fn put_prefix(dst: &mut BytesMut, len: usize) {
    let len = u32::try_from(len).expect("checked against a u32 limit");
    dst.put_u32_le(len);
}

/// Splits a byte stream into frame payloads, from input handed to it in pieces of any size.
///
/// Pure: it does no I/O, so the caller decides how bytes arrive (a socket read, a test's
/// byte-by-byte split, a fuzzer's input). It holds at most one incomplete frame, and never
/// more than [`FRAME_PREFIX_BYTES`] + `frame_bytes_max` bytes: it copies from the input
/// only what the current frame still needs, and sizes its buffer only after the frame's
/// prefix has passed [`check_frame_len`].
///
/// After an error the stream cannot be resynchronised (the decoder no longer knows where
/// a frame starts), so every later call returns the same error; drop the connection.
///
/// ```
/// use chatlog_wire::frame::{FrameDecoder, encode_payload};
/// use chatlog_wire::limits::FRAME_BYTES_MAX;
///
/// let mut stream = bytes::BytesMut::new();
/// encode_payload(b"one", FRAME_BYTES_MAX, &mut stream)?;
/// encode_payload(b"two", FRAME_BYTES_MAX, &mut stream)?;
///
/// let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
/// let mut frames = Vec::new();
/// for piece in stream.chunks(5) {
///     let mut input = piece;
///     while let Some(payload) = decoder.decode(&mut input)? {
///         frames.push(payload);
///     }
/// }
/// decoder.finish()?;
/// assert_eq!(frames, [&b"one"[..], &b"two"[..]]);
/// # Ok::<(), chatlog_wire::Error>(())
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    /// Largest payload accepted, in bytes.
    frame_bytes_max: u32,
    /// Where in the current frame the next input byte belongs.
    state: DecoderState,
}

#[derive(Debug)]
enum DecoderState {
    /// Between frames or inside a prefix: `filled` bytes of the prefix have arrived.
    Prefix {
        prefix: [u8; FRAME_PREFIX_BYTES],
        filled: usize,
    },
    /// Inside a payload whose length `len` passed the limit check. `payload` holds the
    /// bytes received so far; its capacity never exceeds `len`.
    Payload { payload: Vec<u8>, len: usize },
    /// A prefix failed the limit check; `len` is what it said.
    Failed { len: u32 },
}

impl DecoderState {
    const START: DecoderState = DecoderState::Prefix {
        prefix: [0; FRAME_PREFIX_BYTES],
        filled: 0,
    };
}

impl FrameDecoder {
    /// A decoder for frames of at most `frame_bytes_max` payload bytes.
    ///
    /// # Panics
    ///
    /// If `frame_bytes_max` is 0: no frame could ever be accepted.
    pub fn new(frame_bytes_max: u32) -> Self {
        assert!(frame_bytes_max > 0, "a frame limit of 0 accepts nothing");
        FrameDecoder {
            frame_bytes_max,
            state: DecoderState::START,
        }
    }

    /// The payload limit this decoder enforces, in bytes.
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }

    /// Consumes bytes from the front of `input` and returns the next complete payload.
    ///
    /// Returns `Ok(Some(payload))` as soon as a frame is complete, with `input` advanced
    /// past it and possibly not yet empty: call again until it returns `Ok(None)`, which
    /// it does only once `input` is fully consumed and no frame is complete yet. Returns
    /// an error, consuming nothing past the bad prefix, when a prefix is 0 or above the
    /// limit.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Bytes>> {
        loop {
            match &mut self.state {
                DecoderState::Failed { len } => {
                    let len = *len;
                    return Err(self.prefix_error(len));
                }
                DecoderState::Prefix { prefix, filled } => {
                    let take = (FRAME_PREFIX_BYTES - *filled).min(input.len());
                    prefix[*filled..*filled + take].copy_from_slice(&input[..take]);
                    *filled += take;
                    *input = &input[take..];
                    if *filled < FRAME_PREFIX_BYTES {
                        debug_assert!(input.is_empty());
                        return Ok(None);
                    }
                    let announced = u32::from_le_bytes(*prefix);
                    match check_frame_len(u64::from(announced), self.frame_bytes_max) {
                        Ok(len) => {
                            // No allocation yet: the buffer grows with the bytes that
                            // actually arrive.
                            self.state = DecoderState::Payload {
                                payload: Vec::new(),
                                len,
                            };
                        }
                        Err(error) => {
                            self.state = DecoderState::Failed { len: announced };
                            return Err(error);
                        }
                    }
                }
                DecoderState::Payload { payload, len } => {
                    let take = (*len - payload.len()).min(input.len());
                    reserve_payload(payload, *len, take);
                    payload.extend_from_slice(&input[..take]);
                    *input = &input[take..];
                    debug_assert!(
                        payload.capacity() <= *len,
                        "payload buffer grew past its frame"
                    );
                    if payload.len() < *len {
                        debug_assert!(input.is_empty());
                        return Ok(None);
                    }
                    let payload = std::mem::take(payload);
                    self.state = DecoderState::START;
                    return Ok(Some(Bytes::from(payload)));
                }
            }
        }
    }

    /// Changes the payload limit for frames whose prefix has not started arriving yet,
    /// for example once a handshake has told what the peer enforces.
    ///
    /// # Panics
    ///
    /// If `frame_bytes_max` is 0.
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        assert!(frame_bytes_max > 0, "a frame limit of 0 accepts nothing");
        self.frame_bytes_max = frame_bytes_max;
    }

    /// Bytes of an incomplete frame held, prefix included; 0 between frames.
    pub fn buffered_bytes(&self) -> usize {
        match &self.state {
            DecoderState::Prefix { filled, .. } => *filled,
            DecoderState::Payload { payload, .. } => FRAME_PREFIX_BYTES + payload.len(),
            DecoderState::Failed { .. } => 0,
        }
    }

    /// Checks that the stream may end here: `Ok` between frames, an error inside one (or
    /// after a failed prefix).
    pub fn finish(&self) -> Result<()> {
        match &self.state {
            DecoderState::Prefix { filled: 0, .. } => Ok(()),
            DecoderState::Prefix { filled, .. } => Err(Error::TruncatedFrame {
                expected: FRAME_PREFIX_BYTES as u64,
                received: *filled as u64,
            }),
            DecoderState::Payload { payload, len } => Err(Error::TruncatedFrame {
                expected: (FRAME_PREFIX_BYTES + *len) as u64,
                received: (FRAME_PREFIX_BYTES + payload.len()) as u64,
            }),
            DecoderState::Failed { len } => Err(self.prefix_error(*len)),
        }
    }

    /// Inside a payload with at least `min` bytes still to come: its buffer, grown as
    /// [`FrameDecoder::decode`] grows it for `min` incoming bytes ([`PAYLOAD_GROWTH`],
    /// never past the frame), and how many bytes may be read straight into its spare
    /// capacity. [`FrameReader`] reads large payloads this way, without a copy through
    /// its read buffer; [`FrameDecoder::take_complete`] then hands out a finished one.
    fn payload_room(&mut self, min: usize) -> Option<(&mut Vec<u8>, usize)> {
        match &mut self.state {
            DecoderState::Payload { payload, len } if *len - payload.len() >= min => {
                reserve_payload(payload, *len, min);
                let room = (payload.capacity() - payload.len()).min(*len - payload.len());
                Some((payload, room))
            }
            _ => None,
        }
    }

    /// The payload, when bytes read through [`FrameDecoder::payload_room`] completed it.
    fn take_complete(&mut self) -> Option<Bytes> {
        match &mut self.state {
            DecoderState::Payload { payload, len } if payload.len() == *len => {
                let payload = std::mem::take(payload);
                self.state = DecoderState::START;
                Some(Bytes::from(payload))
            }
            _ => None,
        }
    }

    fn prefix_error(&self, len: u32) -> Error {
        check_frame_len(u64::from(len), self.frame_bytes_max)
            .expect_err("a failed prefix fails its check again")
    }
}

/// Makes room in `payload` for `incoming` more bytes of a `len`-byte frame: growing
/// [`PAYLOAD_GROWTH`]-fold (so trickling input costs amortised O(1) copies per byte),
/// never past `len`.
fn reserve_payload(payload: &mut Vec<u8>, len: usize, incoming: usize) {
    let needed = payload.len() + incoming;
    if needed <= payload.capacity() {
        return;
    }
    let target = needed
        .max(payload.capacity().saturating_mul(PAYLOAD_GROWTH))
        .min(len);
    payload.reserve_exact(target - payload.len());
}

/// Reads one frame's payload from `reader`.
///
/// Returns `Ok(None)` when the stream ends cleanly between frames, and
/// [`Error::TruncatedFrame`] when it ends inside one. The prefix is checked before any
/// buffer is allocated, and the buffer then grows with the bytes that arrive (starting at
/// 64 KiB), so a peer that announces a large frame and stalls holds little memory.
///
/// Reads exactly one frame and nothing past it. Not cancel-safe: if the future is dropped
/// midway, the bytes read so far are lost and the stream is out of step. Use it from a
/// task that owns the reader; where reads must race other events (`select!`), read into a
/// buffer and use [`FrameDecoder`], which keeps partial frames across calls.
pub async fn read_frame<R>(reader: &mut R, frame_bytes_max: u32) -> Result<Option<Bytes>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    let mut filled = 0;
    while filled < FRAME_PREFIX_BYTES {
        let read = read_some(reader, &mut prefix[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(Error::TruncatedFrame {
                expected: FRAME_PREFIX_BYTES as u64,
                received: filled as u64,
            });
        }
        filled += read;
    }
    let len = check_frame_len(u64::from(u32::from_le_bytes(prefix)), frame_bytes_max)?;

    let mut payload = Vec::new();
    let mut received = 0;
    while received < len {
        if received == payload.len() {
            let target = payload
                .len()
                .saturating_mul(2)
                .max(PAYLOAD_CHUNK_BYTES)
                .min(len);
            payload.resize(target, 0);
        }
        let read = read_some(reader, &mut payload[received..]).await?;
        if read == 0 {
            return Err(Error::TruncatedFrame {
                expected: (FRAME_PREFIX_BYTES + len) as u64,
                received: (FRAME_PREFIX_BYTES + received) as u64,
            });
        }
        received += read;
    }
    debug_assert_eq!(payload.len(), len);
    Ok(Some(Bytes::from(payload)))
}

/// Reads one frame and decodes its payload as `M`; `Ok(None)` at a clean end of stream.
///
/// Not cancel-safe; see [`read_frame`].
pub async fn read_message<M, R>(reader: &mut R, frame_bytes_max: u32) -> Result<Option<M>>
where
    M: Message + Default,
    R: AsyncRead + Unpin + ?Sized,
{
    match read_frame(reader, frame_bytes_max).await? {
        Some(payload) => decode_message(payload).map(Some),
        None => Ok(None),
    }
}

/// Writes one frame holding `payload` to `writer`, in a single `write_all`.
///
/// Prefix and payload go out together so that a socket with Nagle's algorithm does not
/// hold the payload back. Does not flush: flush a buffered writer after a batch of
/// frames. Not cancel-safe: a dropped future may leave half a frame written.
pub async fn write_frame<W>(writer: &mut W, payload: &[u8], frame_bytes_max: u32) -> Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut frame = BytesMut::new();
    encode_payload(payload, frame_bytes_max, &mut frame)?;
    write_all(writer, &frame).await
}

/// Encodes `message` and writes it as one frame to `writer`, in a single `write_all`.
///
/// Does not flush, and is not cancel-safe; see [`write_frame`].
pub async fn write_message<M, W>(writer: &mut W, message: &M, frame_bytes_max: u32) -> Result<()>
where
    M: Message,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut frame = BytesMut::new();
    encode_message(message, frame_bytes_max, &mut frame)?;
    write_all(writer, &frame).await
}

/// Bytes [`FrameReader`] asks the stream for in one `read`.
///
/// Why: large enough that a burst of small pipelined frames (~500 bytes each) costs one
/// system call per hundred-odd frames, small enough to keep per connection.
pub const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Reads frames from a stream through a [`FrameDecoder`], so that reading is
/// cancel-safe: use [`FrameReader::next_frame`] inside `select!` or under a timeout, and a
/// cancelled call loses nothing (a partial frame stays in the decoder, unread input in
/// the reader's fixed buffer).
///
/// Memory per reader: one [`READ_CHUNK_BYTES`] buffer plus at most one incomplete frame.
#[derive(Debug)]
pub struct FrameReader<R> {
    /// The stream.
    reader: R,
    /// Where frames are cut out of the input.
    decoder: FrameDecoder,
    /// Input read but not yet decoded is `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames of at most `frame_bytes_max` payload bytes from `reader`.
    pub fn new(reader: R, frame_bytes_max: u32) -> Self {
        FrameReader {
            reader,
            decoder: FrameDecoder::new(frame_bytes_max),
            buf: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next frame's payload; `Ok(None)` when the stream ends cleanly between frames.
    ///
    /// Errors as [`FrameDecoder::decode`] and [`FrameDecoder::finish`] do, or with
    /// [`Error::Io`]. After an error the stream is out of step: drop it. Cancel-safe.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.start < self.end {
                let mut input = &self.buf[self.start..self.end];
                let decoded = self.decoder.decode(&mut input);
                self.start = self.end - input.len();
                if let Some(payload) = decoded? {
                    return Ok(Some(payload));
                }
                debug_assert_eq!(self.start, self.end, "decoder left input unconsumed");
            }
            // Inside a large payload with nothing buffered: read straight into it (one
            // copy fewer, and reads as large as the payload's room, not the buffer's).
            if let Some((payload, room)) = self.decoder.payload_room(READ_CHUNK_BYTES) {
                // An await point; cancel-safe like the other (`poll_read` fills nothing
                // unless it returns ready).
                if read_into_spare(&mut self.reader, payload, room).await? == 0 {
                    self.decoder.finish()?;
                    return Ok(None);
                }
                if let Some(payload) = self.decoder.take_complete() {
                    return Ok(Some(payload));
                }
                continue;
            }
            // An await point; `AsyncRead::read` is cancel-safe.
            let read = read_some(&mut self.reader, &mut self.buf).await?;
            if read == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.start = 0;
            self.end = read;
        }
    }

    /// Reads the next frame and decodes it as `M`; `Ok(None)` at a clean end of stream.
    /// Cancel-safe. A [`Error::Decode`] leaves the stream in step.
    pub async fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>> {
        match self.next_frame().await? {
            Some(payload) => decode_message(payload).map(Some),
            None => Ok(None),
        }
    }

    /// Changes the payload limit from the next frame on; see
    /// [`FrameDecoder::set_frame_bytes_max`].
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: u32) {
        self.decoder.set_frame_bytes_max(frame_bytes_max);
    }

    /// The stream, for example to shut it down after the last frame.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.reader
    }
}

/// One `read` of at most `n` bytes into the spare capacity of `buf` (which has room for
/// them), retried when interrupted by a signal; returns the bytes read.
async fn read_into_spare<R>(reader: &mut R, buf: &mut Vec<u8>, n: usize) -> Result<usize>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let read = {
        let mut spare = tokio::io::ReadBuf::uninit(&mut buf.spare_capacity_mut()[..n]);
        loop {
            let polled = std::future::poll_fn(|cx| {
                std::pin::Pin::new(&mut *reader).poll_read(cx, &mut spare)
            })
            .await;
            match polled {
                Ok(()) => break spare.filled().len(),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        action: "reading",
                        source,
                    });
                }
            }
        }
    };
    // SAFETY: the read initialised the first `read` bytes of the spare capacity, and
    // `read <= n <= capacity - len`.
    unsafe { buf.set_len(buf.len() + read) };
    Ok(read)
}

/// One `read`, retried when interrupted by a signal.
async fn read_some<R>(reader: &mut R, buf: &mut [u8]) -> Result<usize>
where
    R: AsyncRead + Unpin + ?Sized,
{
    loop {
        match reader.read(buf).await {
            Ok(read) => return Ok(read),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Io {
                    action: "reading",
                    source,
                });
            }
        }
    }
}

async fn write_all<W>(writer: &mut W, frame: &[u8]) -> Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    writer.write_all(frame).await.map_err(|source| Error::Io {
        action: "writing",
        source,
    })
}

#[cfg(test)]
mod tests;
