//! Every limit the protocol itself defines, with the reason for its number.
//!
//! This module owns the numbers that client and server must agree on (protocol versions,
//! frame sizes, field sizes, page sizes). It does not enforce the field limits: the
//! gateway checks requests against them, and `PROTOCOL.md` repeats them for client
//! authors. Limits that belong to one server's configuration (connections, requests in
//! flight, rate limits) live with the server and are reported in `HandshakeOk.limits`.

/// Version of the client protocol described by `proto/chatlog.proto`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Version of the node-to-node protocol described by `proto/node.proto`.
pub const NODE_PROTOCOL_VERSION: u32 = 1;

/// Size of the length prefix in front of every frame: a `u32`, little-endian.
pub const FRAME_PREFIX_BYTES: usize = 4;

/// Largest client frame payload, in bytes, not counting the prefix: 1 MiB.
///
/// Why this number: it is the most one connection can make the gateway buffer for a
/// partial frame, so it multiplies by the connection count into the gateway's worst-case
/// memory (the decoders soften this by growing a buffer only with bytes that actually
/// arrive). It is still far above what a client legitimately sends: a request carries at most one text of [`TEXT_BYTES_MAX`] (16 KiB),
/// and the 512 KiB media parts planned for uploads fit with room for their envelope.
/// Responses that could exceed it (history pages) are cut short by the server instead.
pub const FRAME_BYTES_MAX: u32 = 1024 * 1024;

/// Largest node-to-node frame payload, in bytes, not counting the prefix: 16 MiB.
///
/// Why this number: a Raft append carries a batch of client writes and a snapshot is sent
/// in chunks, and both are better larger (fewer round trips and fsyncs per byte) up to the
/// point where one frame delays heartbeats behind it; 16 MiB takes well under 100 ms on a
/// 10 Gbit/s link. The Raft crate caps its batches and chunks below this.
pub const NODE_FRAME_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Largest message text, in UTF-8 bytes: 16 KiB.
///
/// Why this number: Telegram allows 4,096 characters per message; a character is at most
/// four bytes in UTF-8, so 4,096 characters of any script fit.
pub const TEXT_BYTES_MAX: u32 = 16 * 1024;

/// Most items in one page: history, get-by-seq, chat and member lists, initial members of
/// a new chat, chats in one unread-count request.
///
/// Why this number: history pages of up to 100 are what users of today's messengers know
/// (Telegram and Discord both cap at 100), and 100 events of typical size (~500 bytes)
/// make a ~50 KiB response.
pub const PAGE_ITEMS_MAX: u32 = 100;

/// Largest chat title, in UTF-8 bytes. Telegram allows 128 characters; 256 bytes covers
/// that for most scripts and keeps chat lists small.
pub const TITLE_BYTES_MAX: u32 = 256;

/// Largest user name (handle), in bytes of lowercase ASCII letters, digits and underscore.
/// Telegram usernames are at most 32 characters.
pub const USER_NAME_BYTES_MAX: u32 = 32;

/// Largest device id and device name given at login, in UTF-8 bytes. Enough for a UUID or
/// a platform's device identifier; these are listed in every session list.
pub const DEVICE_ID_BYTES_MAX: u32 = 64;

/// Largest client name in the handshake, in UTF-8 bytes. It only goes to logs.
pub const CLIENT_NAME_BYTES_MAX: u32 = 64;

/// Largest reaction, in UTF-8 bytes: one emoji, including multi-code-point sequences such
/// as flags and family emoji (the longest standard ones are about 30 bytes).
pub const REACTION_BYTES_MAX: u32 = 32;

/// Largest MIME type of a media reference, in bytes (RFC 6838 caps each of its two names
/// at 127 characters; real ones are far shorter).
pub const MEDIA_MIME_TYPE_BYTES_MAX: u32 = 128;

/// Largest file name of a media reference, in UTF-8 bytes: most file systems cap names at
/// 255 bytes.
pub const MEDIA_FILE_NAME_BYTES_MAX: u32 = 256;

/// Bytes of a media reference's SHA-256.
pub const MEDIA_SHA256_BYTES: usize = 32;

/// Room allowed, in one frame, for everything but the text and file name of the largest
/// event or request: ids, varints, tags, media hash and type. Measured below 1 KiB by the
/// tests in `proto.rs`; 4 KiB leaves room for fields added later.
pub const EVENT_OVERHEAD_BYTES_MAX: u32 = 4 * 1024;

// A client frame must be able to hold the largest single request or event, or a history
// page could never make progress (the server always returns at least one event).
const _: () = assert!(
    TEXT_BYTES_MAX + MEDIA_FILE_NAME_BYTES_MAX + EVENT_OVERHEAD_BYTES_MAX <= FRAME_BYTES_MAX
);
// A client request forwarded to the leader's node travels inside one node frame, with
// room for the node envelope.
const _: () = assert!(FRAME_BYTES_MAX + EVENT_OVERHEAD_BYTES_MAX <= NODE_FRAME_BYTES_MAX);
// The prefix holds a frame length, which is a u32.
const _: () = assert!(FRAME_PREFIX_BYTES == size_of::<u32>());

/// Bytes of every media upload part but the last (which may be shorter): 512 KiB.
///
/// Why this number: it is the part size of Telegram's upload API, large enough that the
/// per-request cost (a frame, a CRC, an fdatasync) is small against the bytes, and small
/// enough that a part plus its envelope fits one client frame ([`FRAME_BYTES_MAX`]) and a
/// lost part costs little to resend.
pub const MEDIA_PART_BYTES: u32 = 512 * 1024;

/// Largest media file, in bytes: 4 GiB (Telegram's premium limit; 2 GiB for others).
pub const MEDIA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

/// Most parts a media file can have.
pub const MEDIA_PARTS_MAX: u64 = MEDIA_FILE_BYTES_MAX.div_ceil(MEDIA_PART_BYTES as u64);

/// Most bytes one `media_download` answers: one part's worth, so a range aligned to parts
/// touches (and checks the CRC of) exactly one stored part, and the answer fits a frame.
pub const MEDIA_DOWNLOAD_BYTES_MAX: u32 = MEDIA_PART_BYTES;

// A part or a download answer, with its envelope, fits one client frame.
const _: () = assert!(MEDIA_PART_BYTES + EVENT_OVERHEAD_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(MEDIA_DOWNLOAD_BYTES_MAX + EVENT_OVERHEAD_BYTES_MAX <= FRAME_BYTES_MAX);
// Part indexes fit the protocol's u32.
const _: () = assert!(MEDIA_PARTS_MAX <= u32::MAX as u64);
