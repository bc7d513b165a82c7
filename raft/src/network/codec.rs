//! Bytes of openraft's RPC messages between nodes: the opaque payloads of
//! `chatlog.node.v1.NodeFrame` (`wire/proto/node.proto`).
//!
//! What it owns: the encodings, byte by byte, and their checks on decode. What it must not
//! do: I/O, or trust its input. These bytes come from the network, so every decoder checks
//! lengths and counts before it allocates, refuses unknown kinds, flag bytes other than 0
//! and 1 and trailing bytes, and returns a [`DecodeError`] instead of panicking. Log ids,
//! votes, memberships and entries use the disk encodings of [`crate::codec`], so an entry
//! read from the engine goes onto the wire as the same bytes.
//!
//! All integers are little-endian and fixed-width. `OptLogId` is a flag byte (0 = none,
//! 1 = some) followed, when 1, by a `LogId` (24 bytes); `Vote` is 17 bytes (`codec`).
//!
//! ```text
//! AppendEntriesRequest   Vote | prev_log_id OptLogId | leader_commit OptLogId
//!                        | entry_count u32 | per entry: len u32 | Entry (codec, len bytes)
//! AppendEntriesResponse  kind u8: 0 Success
//!                                 1 PartialSuccess | OptLogId
//!                                 2 Conflict
//!                                 3 HigherVote | Vote
//! VoteRequest            Vote | last_log_id OptLogId | leadership_transfer u8 (0/1)
//!                        (also the pre-vote request)
//! VoteResponse           Vote | vote_granted u8 (0/1) | last_log_id OptLogId
//! SnapshotChunk          Vote | has_meta u8 (0/1) [| SnapshotMeta] | offset u64
//!                        | done u8 (0/1) | data_len u32 | data (data_len bytes)
//!   SnapshotMeta         last_log_id OptLogId | membership_log_id OptLogId | Membership
//! SnapshotResponse       Vote
//! TransferLeaderRequest  from_leader Vote | to_node_id u64 | last_log_id OptLogId
//! TransferLeaderResponse kind u8: 0 accepted
//!                                 1 VoteChanged | expected Vote | actual Vote
//!                                 2 LogNotFlushed | expected OptLogId | actual OptLogId
//! ```
//!
//! A snapshot chunk carries the meta exactly when its offset is 0 (the first chunk);
//! the decoder enforces that pairing.
//!
//! Forwarded client work (not openraft messages; the group is the frame's `group_id`):
//!
//! ```text
//! ProposeRequest     count u32 (1..=FORWARD_COMMANDS_MAX)
//!                    | per command: len u32 | Command (chat::Command::encode_into)
//! ProposeResponse    index u64 | count u32 | per command: ProposeResult
//!                    (index: the highest Raft index that carried one of the commands,
//!                    0 if none; a replica that applied it sees every result's effect)
//!   ProposeResult    kind u8: 0 Event | chat u64 | seq u64 | timestamp_ms u64 | dedup u8
//!                             1 UserCreated | user u64
//!                             2 LoggedIn | user u64 | session_id u64
//!                             3 UserEvent | user u64 | seq u64 | read_seq u64
//!                             4 Refused | code u8 (1..=5) | message Str
//!                             5 NotLeader | has_leader u8 (0/1) [| leader u64]
//!                             6 Unknown | detail Str
//!                             7 Unavailable | detail Str
//!                            50 Placement | version u64 | changed u8 (0/1)
//! ReadIndexRequest   (empty)
//! ReadIndexResponse  kind u8: 0 Ok | index u64
//!                             5 NotLeader | has_leader u8 (0/1) [| leader u64]
//!                             7 Unavailable | detail Str
//! Str                len u32 (at most FORWARD_TEXT_BYTES_MAX) | UTF-8 bytes
//! ```

use bytes::Bytes;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderError,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};

use crate::chat::{Command, Outcome, Refusal, RefusalCode};
pub use crate::codec::DecodeError;
use crate::codec::{
    ENTRY_HEADER_BYTES, Reader, decode_entry, encode_entry, put_log_id, put_membership, put_vote,
};
use crate::node::ProposeError;
use crate::types::{GroupId, LogId, SnapshotMeta, StoredMembership, TypeConfig, Vote};

/// One chunk of a snapshot in transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The sending leader's vote.
    pub vote: Vote,
    /// The snapshot's meta; present exactly on the chunk at offset 0.
    pub meta: Option<SnapshotMeta>,
    /// Where `data` starts in the snapshot's bytes.
    pub offset: u64,
    /// The chunk's bytes (a slice of the frame's buffer when decoded).
    pub data: Bytes,
    /// Whether this is the last chunk.
    pub done: bool,
}

fn put_opt_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
    match id {
        Some(id) => {
            out.push(1);
            put_log_id(out, id);
        }
        None => out.push(0),
    }
}

fn opt_log_id(r: &mut Reader<'_>) -> Result<Option<LogId>, DecodeError> {
    if r.bool()? {
        Ok(Some(r.log_id()?))
    } else {
        Ok(None)
    }
}

fn put_u32_len(out: &mut Vec<u8>, len: usize) {
    // Callers bound their lengths far below u32::MAX (frames are at most 16 MiB); a
    // larger one is a bug that must not become a silently wrapped length.
    let len = u32::try_from(len).expect("a length inside one node frame fits in u32");
    out.extend_from_slice(&len.to_le_bytes());
}

/// Encodes an append-entries request.
pub fn encode_append_entries_request(req: &AppendEntriesRequest<TypeConfig>) -> Bytes {
    let mut out = Vec::new();
    put_vote(&mut out, &req.vote);
    put_opt_log_id(&mut out, req.prev_log_id.as_ref());
    put_opt_log_id(&mut out, req.leader_commit.as_ref());
    put_u32_len(&mut out, req.entries.len());
    for entry in &req.entries {
        let bytes = encode_entry(entry);
        put_u32_len(&mut out, bytes.len());
        out.extend_from_slice(&bytes);
    }
    Bytes::from(out)
}

/// Decodes a request made by [`encode_append_entries_request`]. Normal entries' payloads
/// are slices of `bytes` (no copy).
pub fn decode_append_entries_request(
    bytes: &Bytes,
) -> Result<AppendEntriesRequest<TypeConfig>, DecodeError> {
    let mut r = Reader::new("append-entries request", bytes);
    let vote = r.vote()?;
    let prev_log_id = opt_log_id(&mut r)?;
    let leader_commit = opt_log_id(&mut r)?;
    let count = r.count(4 + ENTRY_HEADER_BYTES)?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32()? as usize;
        let start = r.offset();
        r.take(len)?;
        entries.push(decode_entry(&bytes.slice(start..start + len))?);
    }
    r.finish()?;
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

const APPEND_SUCCESS: u8 = 0;
const APPEND_PARTIAL_SUCCESS: u8 = 1;
const APPEND_CONFLICT: u8 = 2;
const APPEND_HIGHER_VOTE: u8 = 3;

/// Encodes an append-entries response.
pub fn encode_append_entries_response(resp: &AppendEntriesResponse<TypeConfig>) -> Bytes {
    let mut out = Vec::with_capacity(1 + 25);
    match resp {
        AppendEntriesResponse::Success => out.push(APPEND_SUCCESS),
        AppendEntriesResponse::PartialSuccess(id) => {
            out.push(APPEND_PARTIAL_SUCCESS);
            put_opt_log_id(&mut out, id.as_ref());
        }
        AppendEntriesResponse::Conflict => out.push(APPEND_CONFLICT),
        AppendEntriesResponse::HigherVote(vote) => {
            out.push(APPEND_HIGHER_VOTE);
            put_vote(&mut out, vote);
        }
    }
    Bytes::from(out)
}

/// Decodes a response made by [`encode_append_entries_response`].
pub fn decode_append_entries_response(
    bytes: &[u8],
) -> Result<AppendEntriesResponse<TypeConfig>, DecodeError> {
    let mut r = Reader::new("append-entries response", bytes);
    let resp = match r.u8()? {
        APPEND_SUCCESS => AppendEntriesResponse::Success,
        APPEND_PARTIAL_SUCCESS => AppendEntriesResponse::PartialSuccess(opt_log_id(&mut r)?),
        APPEND_CONFLICT => AppendEntriesResponse::Conflict,
        APPEND_HIGHER_VOTE => AppendEntriesResponse::HigherVote(r.vote()?),
        other => return Err(r.error(format!("unknown response kind {other}"))),
    };
    r.finish()?;
    Ok(resp)
}

/// Encodes a vote (or pre-vote) request.
pub fn encode_vote_request(req: &VoteRequest<TypeConfig>) -> Bytes {
    let mut out = Vec::with_capacity(17 + 25 + 1);
    put_vote(&mut out, &req.vote);
    put_opt_log_id(&mut out, req.last_log_id.as_ref());
    out.push(u8::from(req.leadership_transfer));
    Bytes::from(out)
}

/// Decodes a request made by [`encode_vote_request`].
pub fn decode_vote_request(bytes: &[u8]) -> Result<VoteRequest<TypeConfig>, DecodeError> {
    let mut r = Reader::new("vote request", bytes);
    let vote = r.vote()?;
    let last_log_id = opt_log_id(&mut r)?;
    let leadership_transfer = r.bool()?;
    r.finish()?;
    Ok(VoteRequest {
        vote,
        last_log_id,
        leadership_transfer,
    })
}

/// Encodes a vote (or pre-vote) response.
pub fn encode_vote_response(resp: &VoteResponse<TypeConfig>) -> Bytes {
    let mut out = Vec::with_capacity(17 + 1 + 25);
    put_vote(&mut out, &resp.vote);
    out.push(u8::from(resp.vote_granted));
    put_opt_log_id(&mut out, resp.last_log_id.as_ref());
    Bytes::from(out)
}

/// Decodes a response made by [`encode_vote_response`].
pub fn decode_vote_response(bytes: &[u8]) -> Result<VoteResponse<TypeConfig>, DecodeError> {
    let mut r = Reader::new("vote response", bytes);
    let vote = r.vote()?;
    let vote_granted = r.bool()?;
    let last_log_id = opt_log_id(&mut r)?;
    r.finish()?;
    Ok(VoteResponse {
        vote,
        vote_granted,
        last_log_id,
    })
}

/// Encodes a snapshot chunk.
///
/// # Panics
///
/// If the meta is present on a chunk at an offset other than 0 or missing at offset 0:
/// the sender builds chunks, and a mismatch is a bug there.
pub fn encode_snapshot_chunk(chunk: &SnapshotChunk) -> Bytes {
    assert_eq!(
        chunk.meta.is_some(),
        chunk.offset == 0,
        "snapshot meta goes with the chunk at offset 0, and only there"
    );
    let mut out = Vec::with_capacity(17 + 128 + 13 + chunk.data.len());
    put_vote(&mut out, &chunk.vote);
    match &chunk.meta {
        Some(meta) => {
            out.push(1);
            put_opt_log_id(&mut out, meta.last_log_id.as_ref());
            put_opt_log_id(&mut out, meta.last_membership.log_id().as_ref());
            put_membership(&mut out, meta.last_membership.membership());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&chunk.offset.to_le_bytes());
    out.push(u8::from(chunk.done));
    put_u32_len(&mut out, chunk.data.len());
    out.extend_from_slice(&chunk.data);
    Bytes::from(out)
}

/// Decodes a chunk made by [`encode_snapshot_chunk`]; `data` is a slice of `bytes`.
pub fn decode_snapshot_chunk(bytes: &Bytes) -> Result<SnapshotChunk, DecodeError> {
    let mut r = Reader::new("snapshot chunk", bytes);
    let vote = r.vote()?;
    let meta = if r.bool()? {
        let last_log_id = opt_log_id(&mut r)?;
        let membership_log_id = opt_log_id(&mut r)?;
        let membership = r.membership()?;
        Some(SnapshotMeta {
            last_log_id,
            last_membership: StoredMembership::new(membership_log_id, membership),
        })
    } else {
        None
    };
    let offset = r.u64()?;
    if meta.is_some() != (offset == 0) {
        return Err(r.error(format!(
            "meta {} on a chunk at offset {offset}",
            if meta.is_some() { "present" } else { "missing" }
        )));
    }
    let done = r.bool()?;
    let len = r.u32()? as usize;
    let start = r.offset();
    r.take(len)?;
    r.finish()?;
    Ok(SnapshotChunk {
        vote,
        meta,
        offset,
        data: bytes.slice(start..start + len),
        done,
    })
}

/// Encodes a snapshot response (the answer to every chunk).
pub fn encode_snapshot_response(resp: &SnapshotResponse<TypeConfig>) -> Bytes {
    let mut out = Vec::with_capacity(17);
    put_vote(&mut out, &resp.vote);
    Bytes::from(out)
}

/// Decodes a response made by [`encode_snapshot_response`].
pub fn decode_snapshot_response(bytes: &[u8]) -> Result<SnapshotResponse<TypeConfig>, DecodeError> {
    let mut r = Reader::new("snapshot response", bytes);
    let vote = r.vote()?;
    r.finish()?;
    Ok(SnapshotResponse { vote })
}

/// Encodes a leadership-transfer request.
pub fn encode_transfer_leader_request(req: &TransferLeaderRequest<TypeConfig>) -> Bytes {
    let mut out = Vec::with_capacity(17 + 8 + 25);
    put_vote(&mut out, req.from_leader());
    out.extend_from_slice(&req.to_node_id().to_le_bytes());
    put_opt_log_id(&mut out, req.last_log_id());
    Bytes::from(out)
}

/// Decodes a request made by [`encode_transfer_leader_request`].
pub fn decode_transfer_leader_request(
    bytes: &[u8],
) -> Result<TransferLeaderRequest<TypeConfig>, DecodeError> {
    let mut r = Reader::new("transfer-leader request", bytes);
    let from_leader = r.vote()?;
    let to_node_id = r.u64()?;
    let last_log_id = opt_log_id(&mut r)?;
    r.finish()?;
    Ok(TransferLeaderRequest::new(
        from_leader,
        to_node_id,
        last_log_id,
    ))
}

const TRANSFER_ACCEPTED: u8 = 0;
const TRANSFER_VOTE_CHANGED: u8 = 1;
const TRANSFER_LOG_NOT_FLUSHED: u8 = 2;

/// Encodes a leadership-transfer response.
pub fn encode_transfer_leader_response(resp: &TransferLeaderResponse<TypeConfig>) -> Bytes {
    let mut out = Vec::with_capacity(1 + 50);
    match resp {
        Ok(()) => out.push(TRANSFER_ACCEPTED),
        Err(TransferLeaderError::VoteChanged { expected, actual }) => {
            out.push(TRANSFER_VOTE_CHANGED);
            put_vote(&mut out, expected);
            put_vote(&mut out, actual);
        }
        Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
            out.push(TRANSFER_LOG_NOT_FLUSHED);
            put_opt_log_id(&mut out, expected.as_ref());
            put_opt_log_id(&mut out, actual.as_ref());
        }
    }
    Bytes::from(out)
}

/// Decodes a response made by [`encode_transfer_leader_response`].
pub fn decode_transfer_leader_response(
    bytes: &[u8],
) -> Result<TransferLeaderResponse<TypeConfig>, DecodeError> {
    let mut r = Reader::new("transfer-leader response", bytes);
    let resp = match r.u8()? {
        TRANSFER_ACCEPTED => Ok(()),
        TRANSFER_VOTE_CHANGED => Err(TransferLeaderError::VoteChanged {
            expected: r.vote()?,
            actual: r.vote()?,
        }),
        TRANSFER_LOG_NOT_FLUSHED => Err(TransferLeaderError::LogNotFlushed {
            expected: opt_log_id(&mut r)?,
            actual: opt_log_id(&mut r)?,
        }),
        other => return Err(r.error(format!("unknown response kind {other}"))),
    };
    r.finish()?;
    Ok(resp)
}

/// Commands in one forwarded proposal at most.
///
/// Why: the receiver proposes each through its batcher at once; 4096 is one full Raft
/// entry ([`crate::node::ENTRY_COMMANDS_MAX`]), and a larger request would only wait
/// in the batcher's queue holding a connection slot.
pub const FORWARD_COMMANDS_MAX: usize = 4096;

/// Bytes of one text field (a refusal message, an error detail) in a forwarded answer.
/// Longer texts are cut by the encoder at a character boundary.
pub const FORWARD_TEXT_BYTES_MAX: usize = 4096;

/// One command's result as the leader reports it.
pub type ProposeResult = Result<Outcome, ProposeError>;

const RESULT_EVENT: u8 = 0;
const RESULT_USER_CREATED: u8 = 1;
const RESULT_LOGGED_IN: u8 = 2;
const RESULT_USER_EVENT: u8 = 3;
const RESULT_REFUSED: u8 = 4;
const RESULT_NOT_LEADER: u8 = 5;
const RESULT_UNKNOWN: u8 = 6;
const RESULT_UNAVAILABLE: u8 = 7;
const RESULT_BOT_DONE: u8 = 8;
/// A placement command's outcome: version u64 | changed u8 (cluster changes, 70-79).
const RESULT_PLACEMENT: u8 = 70;
/// A retention command's outcome: changed u8 (s8retention, 80-84).
const RESULT_RETENTION: u8 = 80;
const RESULT_CHAT_LISTS: u8 = 33;
const RESULT_CHAT_LISTS_DELIVERED: u8 = 34;
const RESULT_MEDIA_STORED: u8 = 40;
const RESULT_READ_INDEX: u8 = 0;
/// A secret-chat command's result (`Outcome::Secret`); 50 and up belong to secret chats.
const RESULT_SECRET: u8 = 50;

fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(FORWARD_TEXT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    put_u32_len(out, end);
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn refusal_code_byte(code: RefusalCode) -> u8 {
    match code {
        RefusalCode::BadRequest => 1,
        RefusalCode::Unauthenticated => 2,
        RefusalCode::PermissionDenied => 3,
        RefusalCode::NotFound => 4,
        RefusalCode::Conflict => 5,
    }
}

fn refusal_code(r: &mut Reader<'_>) -> Result<RefusalCode, DecodeError> {
    Ok(match r.u8()? {
        1 => RefusalCode::BadRequest,
        2 => RefusalCode::Unauthenticated,
        3 => RefusalCode::PermissionDenied,
        4 => RefusalCode::NotFound,
        5 => RefusalCode::Conflict,
        other => return Err(r.error(format!("unknown refusal code {other}"))),
    })
}

/// Encodes the errors a forwarded proposal or read index can answer (kinds 5 to 7).
fn put_propose_error(out: &mut Vec<u8>, e: &ProposeError) {
    match e {
        ProposeError::NotLeader { leader, .. } => {
            out.push(RESULT_NOT_LEADER);
            match leader {
                Some(l) => {
                    out.push(1);
                    out.extend_from_slice(&l.to_le_bytes());
                }
                None => out.push(0),
            }
        }
        ProposeError::Unknown { detail, .. } => {
            out.push(RESULT_UNKNOWN);
            put_text(out, detail);
        }
        ProposeError::Unavailable { detail, .. } => {
            out.push(RESULT_UNAVAILABLE);
            put_text(out, detail);
        }
    }
}

/// Decodes the error of kind `kind` (5 to 7) for `group`; `None` for another kind.
fn propose_error(
    r: &mut Reader<'_>,
    kind: u8,
    group: GroupId,
) -> Result<Option<ProposeError>, DecodeError> {
    Ok(Some(match kind {
        RESULT_NOT_LEADER => ProposeError::NotLeader {
            group,
            leader: if r.bool()? { Some(r.u64()?) } else { None },
        },
        RESULT_UNKNOWN => ProposeError::Unknown {
            group,
            detail: r.string(FORWARD_TEXT_BYTES_MAX)?,
        },
        RESULT_UNAVAILABLE => ProposeError::Unavailable {
            group,
            detail: r.string(FORWARD_TEXT_BYTES_MAX)?,
        },
        _ => return Ok(None),
    }))
}

/// Encodes a forwarded proposal.
///
/// # Panics
///
/// If `commands` is empty or longer than [`FORWARD_COMMANDS_MAX`]: the forwarding node
/// builds the list, and a bad one is a bug there.
pub fn encode_propose_request(commands: &[Command]) -> Bytes {
    assert!(
        !commands.is_empty() && commands.len() <= FORWARD_COMMANDS_MAX,
        "a forwarded proposal carries 1 to {FORWARD_COMMANDS_MAX} commands, not {}",
        commands.len()
    );
    let mut out = Vec::with_capacity(4 + 64 * commands.len());
    put_u32_len(&mut out, commands.len());
    for c in commands {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        c.encode_into(&mut out);
        let len = out.len() - at - 4;
        let len = u32::try_from(len).expect("a command inside one node frame fits in u32");
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    Bytes::from(out)
}

/// Decodes a request made by [`encode_propose_request`], checking every command.
pub fn decode_propose_request(bytes: &[u8]) -> Result<Vec<Command>, DecodeError> {
    let mut r = Reader::new("propose request", bytes);
    // A command is at least its tag byte.
    let count = r.item_count(4 + 1, FORWARD_COMMANDS_MAX)?;
    if count == 0 {
        return Err(r.error("no commands"));
    }
    let mut commands = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32()? as usize;
        commands.push(Command::decode(r.take(len)?)?);
    }
    r.finish()?;
    Ok(commands)
}

/// Encodes the answer to a forwarded proposal: the highest Raft index that carried one
/// of the commands, and one result per command.
pub fn encode_propose_response(index: u64, results: &[ProposeResult]) -> Bytes {
    let mut out = Vec::with_capacity(12 + 34 * results.len());
    out.extend_from_slice(&index.to_le_bytes());
    put_u32_len(&mut out, results.len());
    for result in results {
        match result {
            Ok(Outcome::Event {
                chat,
                seq,
                timestamp_ms,
                deduplicated,
            }) => {
                out.push(RESULT_EVENT);
                for v in [chat, seq, timestamp_ms] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.push(u8::from(*deduplicated));
            }
            Ok(Outcome::UserCreated { user }) => {
                out.push(RESULT_USER_CREATED);
                out.extend_from_slice(&user.to_le_bytes());
            }
            Ok(Outcome::LoggedIn { user, session_id }) => {
                out.push(RESULT_LOGGED_IN);
                out.extend_from_slice(&user.to_le_bytes());
                out.extend_from_slice(&session_id.to_le_bytes());
            }
            Ok(Outcome::UserEvent {
                user,
                seq,
                read_seq,
            }) => {
                out.push(RESULT_USER_EVENT);
                for v in [user, seq, read_seq] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Ok(Outcome::BotDone { bot, value }) => {
                out.push(RESULT_BOT_DONE);
                for v in [bot, value] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Ok(Outcome::Secret(a)) => {
                out.push(RESULT_SECRET);
                out.extend_from_slice(&a.chat.to_le_bytes());
                out.extend_from_slice(&a.n.to_le_bytes());
            }
            Ok(Outcome::ChatLists { applied }) => {
                out.push(RESULT_CHAT_LISTS);
                out.extend_from_slice(&applied.to_le_bytes());
            }
            Ok(Outcome::ChatListsDelivered { users }) => {
                out.push(RESULT_CHAT_LISTS_DELIVERED);
                out.extend_from_slice(&(users.len() as u64).to_le_bytes());
                for u in users {
                    out.extend_from_slice(&u.to_le_bytes());
                }
            }
            Ok(Outcome::Retention { changed }) => {
                out.push(RESULT_RETENTION);
                out.push(u8::from(*changed));
            }
            Ok(Outcome::Placement { version, changed }) => {
                out.push(RESULT_PLACEMENT);
                out.extend_from_slice(&version.to_le_bytes());
                out.push(u8::from(*changed));
            }
            Ok(Outcome::MediaStored {
                uploader,
                first_upload,
            }) => {
                out.push(RESULT_MEDIA_STORED);
                out.extend_from_slice(&uploader.to_le_bytes());
                out.push(u8::from(*first_upload));
            }
            Ok(Outcome::Refused(refusal)) => {
                out.push(RESULT_REFUSED);
                out.push(refusal_code_byte(refusal.code));
                put_text(&mut out, &refusal.message);
            }
            Err(e) => put_propose_error(&mut out, e),
        }
    }
    Bytes::from(out)
}

/// Decodes an answer made by [`encode_propose_response`] for a proposal to `group`.
pub fn decode_propose_response(
    group: GroupId,
    bytes: &[u8],
) -> Result<(u64, Vec<ProposeResult>), DecodeError> {
    let mut r = Reader::new("propose response", bytes);
    let index = r.u64()?;
    // Every result is at least its kind byte and a flag or length.
    let count = r.item_count(2, FORWARD_COMMANDS_MAX)?;
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = r.u8()?;
        let result = match kind {
            RESULT_EVENT => Ok(Outcome::Event {
                chat: r.u64()?,
                seq: r.u64()?,
                timestamp_ms: r.u64()?,
                deduplicated: r.bool()?,
            }),
            RESULT_USER_CREATED => Ok(Outcome::UserCreated { user: r.u64()? }),
            RESULT_LOGGED_IN => Ok(Outcome::LoggedIn {
                user: r.u64()?,
                session_id: r.u64()?,
            }),
            RESULT_USER_EVENT => Ok(Outcome::UserEvent {
                user: r.u64()?,
                seq: r.u64()?,
                read_seq: r.u64()?,
            }),
            RESULT_BOT_DONE => Ok(Outcome::BotDone {
                bot: r.u64()?,
                value: r.u64()?,
            }),
            RESULT_SECRET => Ok(Outcome::Secret(crate::chat::secret::SecretApplied {
                chat: r.u64()?,
                n: r.u64()?,
            })),
            RESULT_RETENTION => Ok(Outcome::Retention { changed: r.bool()? }),
            RESULT_PLACEMENT => Ok(Outcome::Placement {
                version: r.u64()?,
                changed: r.bool()?,
            }),
            RESULT_CHAT_LISTS => Ok(Outcome::ChatLists { applied: r.u64()? }),
            RESULT_CHAT_LISTS_DELIVERED => {
                let n = r.u64_count(8, crate::chat::chat_lists::DELIVERY_RECORDS_MAX)?;
                let users = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
                Ok(Outcome::ChatListsDelivered { users })
            }
            RESULT_MEDIA_STORED => Ok(Outcome::MediaStored {
                uploader: r.u64()?,
                first_upload: r.bool()?,
            }),
            RESULT_REFUSED => Ok(Outcome::Refused(Refusal {
                code: refusal_code(&mut r)?,
                message: r.string(FORWARD_TEXT_BYTES_MAX)?,
            })),
            other => match propose_error(&mut r, other, group)? {
                Some(e) => Err(e),
                None => return Err(r.error(format!("unknown result kind {other}"))),
            },
        };
        results.push(result);
    }
    r.finish()?;
    Ok((index, results))
}

/// Encodes a read-index request (empty: the group is the frame's).
pub fn encode_read_index_request() -> Bytes {
    Bytes::new()
}

/// Checks a read-index request: it must be empty.
pub fn decode_read_index_request(bytes: &[u8]) -> Result<(), DecodeError> {
    Reader::new("read-index request", bytes).finish()
}

/// Encodes the answer to a read-index request: the index, or why there is none.
///
/// # Panics
///
/// On [`ProposeError::Unknown`], which a read index never answers (a bug at the caller).
pub fn encode_read_index_response(result: &Result<u64, ProposeError>) -> Bytes {
    let mut out = Vec::with_capacity(9);
    match result {
        Ok(index) => {
            out.push(RESULT_READ_INDEX);
            out.extend_from_slice(&index.to_le_bytes());
        }
        Err(e @ ProposeError::Unknown { .. }) => {
            panic!("a read index is never of unknown outcome: {e}")
        }
        Err(e) => put_propose_error(&mut out, e),
    }
    Bytes::from(out)
}

/// Decodes an answer made by [`encode_read_index_response`] for `group`.
pub fn decode_read_index_response(
    group: GroupId,
    bytes: &[u8],
) -> Result<Result<u64, ProposeError>, DecodeError> {
    let mut r = Reader::new("read-index response", bytes);
    let result = match r.u8()? {
        RESULT_READ_INDEX => Ok(r.u64()?),
        kind @ (RESULT_NOT_LEADER | RESULT_UNAVAILABLE) => {
            match propose_error(&mut r, kind, group)? {
                Some(e) => Err(e),
                None => return Err(r.error(format!("unknown response kind {kind}"))),
            }
        }
        other => return Err(r.error(format!("unknown response kind {other}"))),
    };
    r.finish()?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::types::{ChatBatch, Entry, EntryPayload, Membership, log_id};

    fn membership(voters: &[u64], learners: &[u64]) -> Membership {
        let voters: BTreeSet<u64> = voters.iter().copied().collect();
        Membership::new_with_defaults(vec![voters], learners.iter().copied())
    }

    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                log_id: log_id(1, 1, 0),
                payload: EntryPayload::Membership(membership(&[1, 2, 3], &[4])),
            },
            Entry {
                log_id: log_id(1, 1, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(2, 3, 2),
                payload: EntryPayload::Normal(ChatBatch(Bytes::from_static(b"hello"))),
            },
            Entry {
                log_id: log_id(2, 3, 3),
                payload: EntryPayload::Normal(ChatBatch(Bytes::new())),
            },
        ]
    }

    /// Every strict prefix, every one-byte extension and (where `flip` names a byte) a
    /// corrupted flag or kind byte must fail to decode, never panic.
    fn refuses_damage<T>(good: &Bytes, decode: impl Fn(&Bytes) -> Result<T, DecodeError>) {
        for len in 0..good.len() {
            assert!(
                decode(&good.slice(..len)).is_err(),
                "a {len}-byte prefix of {} bytes decoded",
                good.len()
            );
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(
            decode(&Bytes::from(long)).is_err(),
            "a trailing byte decoded"
        );
    }

    #[test]
    fn append_entries_requests_round_trip() {
        let requests = [
            AppendEntriesRequest::<TypeConfig> {
                vote: Vote::new_committed(2, 3),
                prev_log_id: None,
                entries: entries(),
                leader_commit: Some(log_id(1, 1, 1)),
            },
            AppendEntriesRequest {
                vote: Vote::new(7, 1),
                prev_log_id: Some(log_id(6, 2, 99)),
                entries: Vec::new(),
                leader_commit: None,
            },
        ];
        for req in requests {
            let bytes = encode_append_entries_request(&req);
            let back = decode_append_entries_request(&bytes).expect("decodes");
            assert_eq!(back.vote, req.vote);
            assert_eq!(back.prev_log_id, req.prev_log_id);
            assert_eq!(back.leader_commit, req.leader_commit);
            assert_eq!(back.entries, req.entries);
            refuses_damage(&bytes, decode_append_entries_request);
        }
    }

    #[test]
    fn append_entries_responses_round_trip() {
        let responses = [
            AppendEntriesResponse::<TypeConfig>::Success,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::PartialSuccess(Some(log_id(3, 2, 17))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new_committed(9, 4)),
        ];
        for resp in responses {
            let bytes = encode_append_entries_response(&resp);
            assert_eq!(decode_append_entries_response(&bytes), Ok(resp));
            refuses_damage(&bytes, |b| decode_append_entries_response(b));
        }
        assert!(decode_append_entries_response(&[4]).is_err());
    }

    #[test]
    fn vote_messages_round_trip() {
        for leadership_transfer in [false, true] {
            for last_log_id in [None, Some(log_id(4, 1, 30))] {
                let req = VoteRequest::<TypeConfig> {
                    vote: Vote::new(5, 2),
                    last_log_id,
                    leadership_transfer,
                };
                let bytes = encode_vote_request(&req);
                assert_eq!(decode_vote_request(&bytes), Ok(req));
                refuses_damage(&bytes, |b| decode_vote_request(b));
            }
        }
        for vote_granted in [false, true] {
            for last_log_id in [None, Some(log_id(4, 1, 30))] {
                let resp = VoteResponse::<TypeConfig> {
                    vote: Vote::new_committed(5, 2),
                    vote_granted,
                    last_log_id,
                };
                let bytes = encode_vote_response(&resp);
                assert_eq!(decode_vote_response(&bytes), Ok(resp));
                refuses_damage(&bytes, |b| decode_vote_response(b));
            }
        }
        // A flag byte other than 0 or 1.
        let mut bytes = encode_vote_request(&VoteRequest::new(Vote::new(1, 1), None)).to_vec();
        *bytes.last_mut().expect("not empty") = 2;
        assert!(decode_vote_request(&bytes).is_err());
    }

    #[test]
    fn snapshot_messages_round_trip() {
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(3, 1, 40)),
            last_membership: StoredMembership::new(
                Some(log_id(1, 1, 0)),
                membership(&[1, 2], &[3]),
            ),
        };
        let chunks = [
            SnapshotChunk {
                vote: Vote::new_committed(3, 1),
                meta: Some(meta.clone()),
                offset: 0,
                data: Bytes::from_static(b"first"),
                done: false,
            },
            SnapshotChunk {
                vote: Vote::new_committed(3, 1),
                meta: None,
                offset: 5,
                data: Bytes::from_static(b"last"),
                done: true,
            },
            SnapshotChunk {
                vote: Vote::new_committed(3, 1),
                meta: Some(SnapshotMeta::default()),
                offset: 0,
                data: Bytes::new(),
                done: true,
            },
        ];
        for chunk in chunks {
            let bytes = encode_snapshot_chunk(&chunk);
            assert_eq!(decode_snapshot_chunk(&bytes), Ok(chunk));
            refuses_damage(&bytes, decode_snapshot_chunk);
        }
        // Meta at a non-zero offset: hand-built, since the encoder refuses to make it.
        let mut bad = Vec::new();
        put_vote(&mut bad, &Vote::new(1, 1));
        bad.push(1);
        put_opt_log_id(&mut bad, None);
        put_opt_log_id(&mut bad, None);
        put_membership(&mut bad, &Membership::default());
        bad.extend_from_slice(&7u64.to_le_bytes());
        bad.push(1);
        bad.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_snapshot_chunk(&Bytes::from(bad)).is_err());

        let resp = SnapshotResponse::<TypeConfig>::new(Vote::new(8, 2));
        let bytes = encode_snapshot_response(&resp);
        assert_eq!(decode_snapshot_response(&bytes), Ok(resp));
        refuses_damage(&bytes, |b| decode_snapshot_response(b));
    }

    #[test]
    fn transfer_leader_messages_round_trip() {
        for last_log_id in [None, Some(log_id(2, 2, 8))] {
            let req =
                TransferLeaderRequest::<TypeConfig>::new(Vote::new_committed(2, 2), 3, last_log_id);
            let bytes = encode_transfer_leader_request(&req);
            assert_eq!(decode_transfer_leader_request(&bytes), Ok(req));
            refuses_damage(&bytes, |b| decode_transfer_leader_request(b));
        }
        let responses: [TransferLeaderResponse<TypeConfig>; 4] = [
            Ok(()),
            Err(TransferLeaderError::VoteChanged {
                expected: Vote::new_committed(2, 2),
                actual: Vote::new(3, 1),
            }),
            Err(TransferLeaderError::LogNotFlushed {
                expected: Some(log_id(2, 2, 8)),
                actual: None,
            }),
            Err(TransferLeaderError::LogNotFlushed {
                expected: None,
                actual: Some(log_id(1, 1, 1)),
            }),
        ];
        for resp in responses {
            let bytes = encode_transfer_leader_response(&resp);
            assert_eq!(decode_transfer_leader_response(&bytes), Ok(resp));
            refuses_damage(&bytes, |b| decode_transfer_leader_response(b));
        }
        assert!(decode_transfer_leader_response(&[3]).is_err());
    }

    #[test]
    fn forwarded_work_round_trips() {
        let commands = vec![
            Command::Post {
                chat: 7,
                sender: 3,
                client_message_id: 9,
                text: "héllo".into(),
                media: None,
                reply_to: 0,
            },
            Command::MarkRead {
                user: 3,
                chat: 7,
                seq: 2,
            },
        ];
        let bytes = encode_propose_request(&commands);
        assert_eq!(decode_propose_request(&bytes), Ok(commands));
        refuses_damage(&bytes, |b| decode_propose_request(b));
        assert!(
            decode_propose_request(&[0, 0, 0, 0]).is_err(),
            "no commands"
        );

        let results: Vec<ProposeResult> = vec![
            Ok(Outcome::Event {
                chat: 7,
                seq: 4,
                timestamp_ms: 99,
                deduplicated: true,
            }),
            Ok(Outcome::UserCreated { user: 5 }),
            Ok(Outcome::MediaStored {
                uploader: 5,
                first_upload: true,
            }),
            Ok(Outcome::LoggedIn {
                user: 5,
                session_id: 2,
            }),
            Ok(Outcome::UserEvent {
                user: 5,
                seq: 3,
                read_seq: 1,
            }),
            Ok(Outcome::BotDone { bot: 5, value: 8 }),
            Ok(Outcome::ChatLists { applied: 6 }),
            Ok(Outcome::ChatListsDelivered { users: vec![5, 7] }),
            Ok(Outcome::Placement {
                version: 9,
                changed: true,
            }),
            Ok(Outcome::Retention { changed: true }),
            Ok(Outcome::Retention { changed: false }),
            Ok(Outcome::Refused(Refusal {
                code: RefusalCode::Conflict,
                message: "taken".into(),
            })),
            Err(ProposeError::NotLeader {
                group: 4,
                leader: Some(2),
            }),
            Err(ProposeError::NotLeader {
                group: 4,
                leader: None,
            }),
            Err(ProposeError::Unknown {
                group: 4,
                detail: "discarded".into(),
            }),
            Err(ProposeError::Unavailable {
                group: 4,
                detail: "stopped".into(),
            }),
        ];
        let bytes = encode_propose_response(17, &results);
        assert_eq!(decode_propose_response(4, &bytes), Ok((17, results)));
        refuses_damage(&bytes, |b| decode_propose_response(4, b));

        // A long text is cut at a character boundary, within the limit.
        let long = Err(ProposeError::Unavailable {
            group: 1,
            detail: "é".repeat(FORWARD_TEXT_BYTES_MAX),
        });
        let bytes = encode_propose_response(0, &[long]);
        match &decode_propose_response(1, &bytes).expect("decodes").1[..] {
            [Err(ProposeError::Unavailable { detail, .. })] => {
                assert!(detail.len() <= FORWARD_TEXT_BYTES_MAX && detail.len() > 4000)
            }
            other => panic!("{other:?}"),
        }

        assert_eq!(
            decode_read_index_request(&encode_read_index_request()),
            Ok(())
        );
        assert!(decode_read_index_request(&[0]).is_err());
        for result in [
            Ok(42),
            Err(ProposeError::NotLeader {
                group: 4,
                leader: Some(3),
            }),
            Err(ProposeError::Unavailable {
                group: 4,
                detail: "no quorum".into(),
            }),
        ] {
            let bytes = encode_read_index_response(&result);
            assert_eq!(decode_read_index_response(4, &bytes), Ok(result));
            refuses_damage(&bytes, |b| decode_read_index_response(4, b));
        }
        // Unknown outcome is not a read-index answer.
        assert!(decode_read_index_response(4, &[RESULT_UNKNOWN, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn garbage_is_refused_without_panics_or_huge_allocations() {
        // A cheap deterministic generator (xorshift), so a failure names its input.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 96) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32 % 64) >> 3) as u8)
                .collect();
            let bytes = Bytes::from(bytes);
            // Results do not matter; decoding must return, not panic.
            let _ = decode_append_entries_request(&bytes);
            let _ = decode_append_entries_response(&bytes);
            let _ = decode_vote_request(&bytes);
            let _ = decode_vote_response(&bytes);
            let _ = decode_snapshot_chunk(&bytes);
            let _ = decode_snapshot_response(&bytes);
            let _ = decode_transfer_leader_request(&bytes);
            let _ = decode_transfer_leader_response(&bytes);
            let _ = decode_propose_request(&bytes);
            let _ = decode_propose_response(1, &bytes);
            let _ = decode_read_index_response(1, &bytes);
            let _ = round;
        }
        // A request announcing u32::MAX entries is refused by the count check.
        let mut huge = Vec::new();
        put_vote(&mut huge, &Vote::new(1, 1));
        huge.extend_from_slice(&[0, 0]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_append_entries_request(&Bytes::from(huge)).expect_err("refused");
        assert!(err.detail.contains("count"), "{err}");
        // An entry whose length runs past the end.
        let mut cut = Vec::new();
        put_vote(&mut cut, &Vote::new(1, 1));
        cut.extend_from_slice(&[0, 0]);
        cut.extend_from_slice(&1u32.to_le_bytes());
        cut.extend_from_slice(&1000u32.to_le_bytes());
        cut.extend_from_slice(&[0; ENTRY_HEADER_BYTES]);
        assert!(decode_append_entries_request(&Bytes::from(cut)).is_err());
    }
}
