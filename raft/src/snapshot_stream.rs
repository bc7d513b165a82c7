//! Snapshots of any size: streamed from the sender's engine, staged on the receiver's
//! disk, installed so that a crash at any point leaves the old state or the whole new one.
//!
//! What it owns: openraft's `SnapshotData` ([`SnapshotData`]: a handle, never the
//! snapshot's bytes in one value), the bytes of the snapshot stream and of its chunk
//! messages (`snapshot_stream_request` / `_response`, fields 60/61 of `NodeFrame`), the
//! sender's loop ([`send`]), the receiver's staging in the group's staging engine log
//! ([`Staging`], `ids::staging_log`), the install intent and the roll-forward at open
//! ([`finish_interrupted_install`]). What it must not do: hold a whole snapshot in memory
//! (the sender holds one chunk, one engine entry of the checkpoint and one window of
//! entries, the receiver one chunk and at most one chunk head or partial entry), hold an
//! encoding of the whole state (s9snap: the checkpoint is sent from its stored pieces and
//! installed as pieces), install anything it has not checked end to end, or decide what a
//! checkpoint holds (`state_machine` decodes it, `checkpoint_chunks` stores it; this
//! module moves its bytes).
//!
//! # The stream
//!
//! A snapshot at log id `S` is one byte stream: the checkpoint section, then the
//! retained log range. The section (s9snap) is the sender's durable incremental
//! checkpoint at `S`, read piece by piece from its engine
//! (`checkpoint_chunks::SectionReader`, "As a snapshot" there): the checkpoint proper
//! (header and the state outside the index chunks, `rest_bytes`), then each index chunk
//! of its region as `k u64 | bytes u64 | crc u32 | bytes`. The range is every entry this
//! replica holds from its first (history below openraft's purge mark included) to `S`,
//! each as `len u32 | entry (codec::encode_entry)`, oldest first. The sender reads the
//! range lazily, [`SEND_WINDOW_ENTRIES`] entries at a time, as the chunks go out;
//! nothing bounds the range's size. A `log_store::HistoryPin` keeps the entries not sent
//! yet from being purged by retention meanwhile (it moves up as they go), and a
//! `checkpoint_chunks::Pin` keeps the checkpoint's pieces until they are read (a newer
//! checkpoint purges them afterwards).
//!
//! Compatibility: the stream of chatlog before s9snap carried a whole checkpoint under
//! `Begin` kind 1; this version refuses it by name (and an older node refuses kind 4 as
//! an unknown kind): every node of a cluster runs the same version
//! (docs/operations.md). An install intent an older version left (a crash in the middle
//! of an install, then an upgrade) is still finished at open.
//!
//! # Chunk messages (little-endian, fixed width; `OptLogId`/`Membership` as in `codec`)
//!
//! ```text
//! StreamChunk  Vote | transfer u64 | seq u32 | kind u8 | body | crc u32
//!              (crc: CRC-32 of every byte before it)
//!   kind 4 Begin  last_log_id OptLogId | membership_log_id OptLogId | Membership
//!                 | checkpoint_bytes u64 (the section) | rest_bytes u64 | chunks u64
//!                 | entries_first u64 | entries_count u64
//!   kind 2 Data   offset u64 | len u32 | len bytes of the stream at offset
//!   kind 3 End    stream_bytes u64 | stream_crc u32 (CRC-32 of the whole stream)
//! StreamAck    transfer u64 | seq u32 | Vote
//! ```
//!
//! A transfer is `Begin` (seq 0, answered before anything else is sent), `Data` chunks
//! of at most [`chunk_bytes`] bytes (seq 1, 2, … at offsets 0, len, …), then `End` (sent
//! once every `Data` is answered). Up to [`window_chunks`] `Data` chunks
//! ([`STREAM_WINDOW_BYTES`]) are in flight: the window is the flow control. They race
//! each other through the receiver's request tasks, so the receiver takes them in seq
//! order, a chunk ahead of its turn waiting for it (at most [`CHUNK_REORDER_WAIT`] and
//! [`STREAM_WINDOW_CHUNKS_MAX`] ahead). The receiver refuses with a clear error a chunk whose CRC is
//! wrong, whose transfer, vote, seq or offset is not the next expected, a stream whose
//! total bytes or CRC at `End` differ from what arrived, an index chunk out of order or
//! whose bytes do not match its CRC-32, a checkpoint section or a count of entries or a
//! last log id other than `Begin` announced, an entry out of order, and a checkpoint
//! whose header does not match the meta. A refused or abandoned transfer is never installed;
//! the next `Begin` of the group (same or new leader, any connection) discards what was
//! staged. The answer to `End` comes after the install (its vote is openraft's answer).
//!
//! # Staging and the install: the order of writes (crash safety)
//!
//! 1. Receiving: each `Data` chunk is submitted to the staging log (pieces of at most a
//!    quarter of the engine's batch limit) and acked once submitted, not once durable;
//!    the engine's group commit makes many chunks durable with one fdatasync, and `End`
//!    completes the transfer only once every staged piece is durable (one wait, before
//!    the intent can be written). A crash mid-transfer loses at most the unsynced
//!    pieces of a transfer that was never going to be installed: it restarts. Neither the
//!    checkpoint nor the Raft log is touched, so a crash (or a sender that vanishes)
//!    leaves the old state; at open, staged pieces without an intent are deleted
//!    ([`finish_interrupted_install`]), at run time the next `Begin` deletes them.
//! 2. `install_snapshot` ([`StagedSnapshot::install`], under the group's checkpoint
//!    lock): a **copy mark** (`ids::META_STAGED_COPY`: where the checkpoint and chunk
//!    logs end now), then the staged checkpoint section is written as this replica's
//!    checkpoint pieces (`checkpoint_chunks::write_section`: each chunk into the chunk
//!    log, checked against its CRC as it is copied, then the checkpoint and a directory
//!    of its own), durable, but not published. The state is loaded from those pieces as
//!    a restart loads a checkpoint (every piece read back checked, chunks against the
//!    directory, the state decoded and its header compared with the meta). A failure
//!    here drops the pieces (`checkpoint_chunks::discard_from`) and the install fails:
//!    nothing changed.
//! 3. The **intent** (`ids::META_STAGED_INSTALL` on the staging log: where the stream
//!    is, the range and the last log id, whether the Raft log is rewritten, and the
//!    pointer to publish), awaited durable. From here on the new state is complete on
//!    disk and the intent says to install it.
//! 4. The pointer is published (`checkpoint_chunks::publish`: one batch, the pointer and
//!    the purge of the old checkpoint's pieces and chunks, except pinned ones).
//! 5. The Raft log rewritten from the staged entries (`log_store::write_staged_range`:
//!    truncate, continue at the range's first index, append, and in the last batch the
//!    purge mark `S`), unless the log already holds `S` from the same leader.
//! 6. One batch deletes the intent, the copy mark and the staged pieces.
//!
//! A crash before 3 is durable leaves the old state: at open the copy mark without an
//! intent drops the unpublished pieces and the staging is deleted. A crash after it, at
//! any point of 4–6, is finished at the next open, before the log store and the state
//! machine read anything: [`finish_interrupted_install`] redoes 4 and 5 (both are
//! idempotent: they rewrite the same pointer and bytes) and then 6. So the replica has
//! either the old checkpoint with its old log, or the new checkpoint with every entry of
//! the range, never a checkpoint without its history and never a pointer to pieces
//! that did not load. The engine makes a batch durable only after every batch submitted
//! before it, which is what makes "the intent is durable" mean "every staged and
//! written piece is durable". Memory: the receiver holds one staged read (4 MiB) and one
//! batch of pieces while writing, then the loaded state (what a restart holds).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatlog_storage::{Engine, WriteBatch};
use futures_util::StreamExt;

use crate::checkpoint_chunks::{
    self, ByteSource, CheckpointHandle, Keeper, PiecesFrom, Pointer, SectionReader, Unpublished,
};
use crate::codec::{self, DecodeError, Reader};
use crate::error::{Error, Result};
use crate::ids;
use crate::log_store::LogReader;
use crate::types::{Entry, GroupId, LogId, Snapshot, SnapshotMeta, StoredMembership, Vote};

/// Bytes of stream data in one chunk: 1 MiB (`network::SNAPSHOT_CHUNK_BYTES_MAX`), so
/// a chunk never holds up the heartbeats queued behind it on the shared connection for
/// long; [`STREAM_WINDOW_BYTES`] of them in flight keep the link and the disk busy.
pub const STREAM_CHUNK_BYTES: usize = crate::network::SNAPSHOT_CHUNK_BYTES_MAX;

/// Smallest chunk [`CHUNK_BYTES_ENV`] may ask for: smaller ones only multiply round trips.
pub const STREAM_CHUNK_BYTES_MIN: usize = 256;

/// Test knob: the stream's chunk size in bytes (clamped to
/// [`STREAM_CHUNK_BYTES_MIN`]..=[`STREAM_CHUNK_BYTES`]), so a black-box test streams a
/// snapshot in hundreds of chunks without writing hundreds of MiB. Unset in production.
pub const CHUNK_BYTES_ENV: &str = "CHATLOG_TEST_SNAPSHOT_CHUNK_BYTES";

/// Test knob: milliseconds the receiver pauses after staging each chunk and between the
/// install's steps, logging each step, so a test can SIGKILL it in the middle of a
/// transfer or of an install. Unset in production.
pub const PAUSE_ENV: &str = "CHATLOG_TEST_SNAPSHOT_PAUSE_MS";

/// Stream bytes the sender keeps in flight (sent, not acknowledged yet): 8 MiB, eight
/// 1 MiB chunks. One chunk in flight left the link idle for a whole round trip per chunk
/// (the receiver's staging write included); eight keep the receiver's disk busy while
/// bounding what a transfer holds in memory on both ends (the receiver holds at most this
/// many chunks waiting for their turn).
pub const STREAM_WINDOW_BYTES: usize = 8 << 20;

/// Chunks in flight at most, whatever their size: bounds the receiver's waiting chunks
/// (each one a task holding its bytes) when a test shrinks chunks to a few hundred bytes.
pub const STREAM_WINDOW_CHUNKS_MAX: usize = 64;

/// How long a chunk that arrived ahead of its turn (chunks in flight race each other
/// through the receiver's request tasks) waits for the ones before it before the
/// transfer is abandoned: the chunk before it was lost with its connection, or the
/// sender gave up.
pub const CHUNK_REORDER_WAIT: Duration = Duration::from_secs(10);

/// Entries the sender reads from its log per window while streaming the range: what it
/// holds besides one chunk. An entry closes at the first command crossing
/// `node::ENTRY_BYTES_MAX` (1 MiB), so a window is at most about 16 × 1 MiB plus the last
/// commands, and usually far less.
pub const SEND_WINDOW_ENTRIES: u64 = 16;

/// Bytes of one entry record in the stream at most: an entry larger than a node frame
/// could never have been replicated. Bounds the receiver's buffer for an entry that
/// straddles chunks.
pub const RECORD_BYTES_MAX: usize = chatlog_wire::limits::NODE_FRAME_BYTES_MAX as usize;

/// Bytes of the checkpoint's start the receiver keeps to check its header against the
/// meta before installing (the header is a few hundred bytes: ids and membership).
pub const HEADER_PREFIX_BYTES_MAX: usize = 64 << 10;

/// Staged bytes read per engine read while installing.
pub const STAGING_READ_BYTES: usize = 4 << 20;

/// Entry bytes written to the Raft log per window while installing (each window is
/// decoded, checked and written before the next is read).
pub const INSTALL_WINDOW_BYTES: usize = 8 << 20;

/// How long the sender waits for the answer to a chunk before `End` (at least; openraft's
/// `soft_ttl` if longer): a chunk's round trip includes waiting for the chunks before it
/// in the window and queueing its staging write behind theirs, which a loaded disk can
/// stretch well past a heartbeat-sized RPC deadline.
pub const CHUNK_WAIT: Duration = Duration::from_secs(10);

/// How long the sender waits for the answer to `End`, which comes after the receiver
/// installed the snapshot (writing its whole range): far longer than a chunk's round trip.
pub const INSTALL_WAIT: Duration = Duration::from_secs(600);

/// `Begin` of the first stream format (a whole checkpoint), sent by chatlog before s9snap:
/// refused with an error naming it.
const KIND_BEGIN_WHOLE: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_END: u8 = 3;
/// `Begin` of the current format: an incremental checkpoint's section (s9snap).
const KIND_BEGIN: u8 = 4;
/// Intent of an install by chatlog before s9snap: the staged checkpoint is whole and is
/// written at the roll-forward.
const INTENT_WHOLE: u8 = 1;
/// Intent of an install since s9snap: the checkpoint's pieces are written and checked,
/// the intent carries the pointer to publish.
const INTENT_WRITTEN: u8 = 2;
const COPY_MARK_VERSION: u8 = 1;

/// The chunk size in use: [`STREAM_CHUNK_BYTES`], or [`CHUNK_BYTES_ENV`] if set.
pub fn chunk_bytes() -> usize {
    std::env::var(CHUNK_BYTES_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(STREAM_CHUNK_BYTES, |n| {
            n.clamp(STREAM_CHUNK_BYTES_MIN, STREAM_CHUNK_BYTES)
        })
}

/// Whether the test hook ([`PAUSE_ENV`]) is on.
fn test_pausing() -> bool {
    std::env::var_os(PAUSE_ENV).is_some()
}

/// Test hook ([`PAUSE_ENV`]): logs `step` and pauses.
async fn test_pause(group: GroupId, step: &str) {
    if let Some(ms) = std::env::var(PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(group, step, "snapshot stream test pause");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

// ---------------------------------------------------------------------------------------
// SnapshotData
// ---------------------------------------------------------------------------------------

/// openraft's `SnapshotData`: where a snapshot's stream comes from, never its bytes in
/// one value.
#[derive(Debug, Clone)]
pub enum SnapshotData {
    /// This replica's own snapshot: its durable incremental checkpoint, by pointer, and
    /// the log; both are read from the engine piece by piece when it is sent.
    Local(LocalSnapshot),
    /// A snapshot received into the staging log, complete and checked.
    Staged(StagedSnapshot),
}

/// A snapshot of this replica.
#[derive(Debug, Clone)]
pub struct LocalSnapshot {
    /// The checkpoint: a durable incremental checkpoint of this replica, by its pointer
    /// (`checkpoint_chunks::CheckpointHandle`), no bytes.
    pub checkpoint: CheckpointHandle,
    /// The group's log, for the range (`None`: the snapshot is the state alone).
    pub log: Option<LogReader>,
    /// The snapshot's last Raft index: the range ends there.
    pub upto: u64,
}

/// A received snapshot waiting in the staging log.
#[derive(Debug, Clone)]
pub struct StagedSnapshot {
    staging: Arc<Staging>,
    layout: StagedLayout,
}

/// Where a staged stream is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StagedLayout {
    transfer: u64,
    /// Staging engine indexes `[first_piece, next_piece)` hold the stream, in order.
    first_piece: u64,
    next_piece: u64,
    /// Bytes of the checkpoint section (before the range).
    checkpoint_bytes: u64,
    /// Bytes of the checkpoint at its start.
    rest_bytes: u64,
    /// Chunk records after it.
    chunks: u64,
    entries_first: u64,
    entries_count: u64,
    /// The snapshot's last log id.
    last: LogId,
}

// ---------------------------------------------------------------------------------------
// Chunk messages
// ---------------------------------------------------------------------------------------

/// What `Begin` announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The snapshot's meta.
    pub meta: SnapshotMeta,
    /// Bytes of the checkpoint section at the stream's start (the checkpoint, then its
    /// chunk records: `checkpoint_chunks`, "As a snapshot").
    pub checkpoint_bytes: u64,
    /// Bytes of the checkpoint itself (header and the state outside the chunks), the
    /// section's first part.
    pub rest_bytes: u64,
    /// Chunk records after it.
    pub chunks: u64,
    /// Raft index of the range's first entry (meaningless when the count is 0).
    pub entries_first: u64,
    /// Entries in the range.
    pub entries_count: u64,
}

/// A chunk's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody {
    /// Starts a transfer.
    Begin(Begin),
    /// Stream bytes at `offset`.
    Data {
        /// Where `data` starts in the stream.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Ends a transfer: what the whole stream was.
    End {
        /// Bytes of the stream.
        stream_bytes: u64,
        /// CRC-32 of the stream.
        stream_crc: u32,
    },
}

/// One message of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// The sending leader's vote.
    pub vote: Vote,
    /// The transfer (chosen by the sender, the same in every chunk of it).
    pub transfer: u64,
    /// The chunk's number in the transfer, from 0 (`Begin`).
    pub seq: u32,
    /// What it carries.
    pub body: ChunkBody,
}

/// The answer to a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAck {
    /// The transfer.
    pub transfer: u64,
    /// The chunk answered.
    pub seq: u32,
    /// The sender's vote before `End`; openraft's answer (the receiver's vote) to `End`.
    pub vote: Vote,
}

fn put_opt_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
    match id {
        Some(id) => {
            out.push(1);
            codec::put_log_id(out, id);
        }
        None => out.push(0),
    }
}

fn opt_log_id(r: &mut Reader<'_>) -> std::result::Result<Option<LogId>, DecodeError> {
    if r.bool()? {
        Ok(Some(r.log_id()?))
    } else {
        Ok(None)
    }
}

/// Encodes a chunk, its CRC last.
pub fn encode_chunk(chunk: &StreamChunk) -> Bytes {
    let data_len = match &chunk.body {
        ChunkBody::Data { data, .. } => data.len(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(64 + 128 + data_len);
    codec::put_vote(&mut out, &chunk.vote);
    out.extend_from_slice(&chunk.transfer.to_le_bytes());
    out.extend_from_slice(&chunk.seq.to_le_bytes());
    match &chunk.body {
        ChunkBody::Begin(b) => {
            out.push(KIND_BEGIN);
            put_opt_log_id(&mut out, b.meta.last_log_id.as_ref());
            put_opt_log_id(&mut out, b.meta.last_membership.log_id().as_ref());
            codec::put_membership(&mut out, b.meta.last_membership.membership());
            out.extend_from_slice(&b.checkpoint_bytes.to_le_bytes());
            out.extend_from_slice(&b.rest_bytes.to_le_bytes());
            out.extend_from_slice(&b.chunks.to_le_bytes());
            out.extend_from_slice(&b.entries_first.to_le_bytes());
            out.extend_from_slice(&b.entries_count.to_le_bytes());
        }
        ChunkBody::Data { offset, data } => {
            out.push(KIND_DATA);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        ChunkBody::End {
            stream_bytes,
            stream_crc,
        } => {
            out.push(KIND_END);
            out.extend_from_slice(&stream_bytes.to_le_bytes());
            out.extend_from_slice(&stream_crc.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Bytes::from(out)
}

/// Decodes a chunk made by [`encode_chunk`], its CRC checked first; `Data` is a slice of
/// `bytes`.
pub fn decode_chunk(bytes: &Bytes) -> std::result::Result<StreamChunk, DecodeError> {
    let what = "snapshot stream chunk";
    if bytes.len() < 4 {
        return Err(DecodeError::new(what, format!("{} bytes", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let got = crc32fast::hash(body);
    if got != want {
        return Err(DecodeError::new(
            what,
            format!("checksum {got:08x}, the chunk says {want:08x}"),
        ));
    }
    let mut r = Reader::new(what, body);
    let vote = r.vote()?;
    let transfer = r.u64()?;
    let seq = r.u32()?;
    let body = match r.u8()? {
        KIND_BEGIN => {
            let last_log_id = opt_log_id(&mut r)?;
            let membership_log_id = opt_log_id(&mut r)?;
            let membership = r.membership()?;
            ChunkBody::Begin(Begin {
                meta: SnapshotMeta {
                    last_log_id,
                    last_membership: StoredMembership::new(membership_log_id, membership),
                },
                checkpoint_bytes: r.u64()?,
                rest_bytes: r.u64()?,
                chunks: r.u64()?,
                entries_first: r.u64()?,
                entries_count: r.u64()?,
            })
        }
        KIND_BEGIN_WHOLE => {
            return Err(r.error(
                "a snapshot stream of the first format (a whole checkpoint), sent by an older \
                 chatlog: every node of a cluster must run the same version (docs/operations.md)",
            ));
        }
        KIND_DATA => {
            let offset = r.u64()?;
            let len = r.u32()? as usize;
            let start = r.offset();
            r.take(len)?;
            ChunkBody::Data {
                offset,
                data: bytes.slice(start..start + len),
            }
        }
        KIND_END => ChunkBody::End {
            stream_bytes: r.u64()?,
            stream_crc: r.u32()?,
        },
        k => return Err(r.error(format!("chunk kind {k}"))),
    };
    r.finish()?;
    Ok(StreamChunk {
        vote,
        transfer,
        seq,
        body,
    })
}

/// Encodes an ack.
pub fn encode_ack(ack: &StreamAck) -> Bytes {
    let mut out = Vec::with_capacity(12 + codec::VOTE_BYTES);
    out.extend_from_slice(&ack.transfer.to_le_bytes());
    out.extend_from_slice(&ack.seq.to_le_bytes());
    codec::put_vote(&mut out, &ack.vote);
    Bytes::from(out)
}

/// Decodes an ack made by [`encode_ack`].
pub fn decode_ack(bytes: &[u8]) -> std::result::Result<StreamAck, DecodeError> {
    let mut r = Reader::new("snapshot stream ack", bytes);
    let ack = StreamAck {
        transfer: r.u64()?,
        seq: r.u32()?,
        vote: r.vote()?,
    };
    r.finish()?;
    Ok(ack)
}

// ---------------------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------------------

/// Why a transfer failed on the sending side.
#[derive(Debug)]
pub enum SendError<E> {
    /// The chunk's round trip failed (the peer refused it, or the network).
    Rpc(E),
    /// This replica could not produce the stream (entries purged while it was sent, a
    /// staged snapshot, a storage error).
    Source(String),
    /// The peer answered something other than the ack of the chunk sent.
    BadAck(String),
}

/// A unique transfer id for this process (the receiver tells transfers apart by it).
fn next_transfer() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        let _ = NEXT.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    NEXT.fetch_add(1, Ordering::Relaxed).max(1)
}

/// Produces a local snapshot's stream a piece at a time.
struct StreamSource {
    group: GroupId,
    /// The checkpoint section, read from the engine (`None` once read to its end).
    section: Option<SectionReader>,
    log: Option<LogReader>,
    /// Keeps the entries not sent yet from being purged meanwhile.
    pin: Option<crate::log_store::HistoryPin>,
    next: u64,
    upto: u64,
    pending: BytesMut,
}

impl StreamSource {
    /// Up to `max` bytes of the stream; empty at its end.
    async fn next_piece(&mut self, max: usize) -> std::result::Result<Bytes, String> {
        while self.pending.len() < max {
            if let Some(section) = self.section.as_mut() {
                let part = section.next_part().map_err(|e| e.to_string())?;
                if part.is_empty() {
                    // Read to its end: its pin goes (the range has a pin of its own).
                    self.section = None;
                } else {
                    self.pending.extend_from_slice(&part);
                }
                continue;
            }
            let Some(log) = self.log.clone() else { break };
            if self.next > self.upto {
                break;
            }
            let (lo, hi) = (
                self.next,
                (self.next + SEND_WINDOW_ENTRIES).min(self.upto + 1),
            );
            let entries = tokio::task::spawn_blocking(move || log.read_history(lo, hi))
                .await
                .map_err(|e| format!("reading entries [{lo}, {hi}): {e}"))?
                .map_err(|e| format!("reading entries [{lo}, {hi}): {e}"))?;
            if entries.len() as u64 != hi - lo
                || entries.first().map(|e| e.log_id.index) != Some(lo)
            {
                return Err(format!(
                    "group {}: entries [{lo}, {hi}) are no longer all held (purged while \
                     the snapshot was sent); a new snapshot will be sent",
                    self.group
                ));
            }
            for e in &entries {
                let bytes = codec::encode_entry(e);
                self.pending
                    .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                self.pending.extend_from_slice(&bytes);
            }
            self.next = hi;
            if let Some(pin) = self.pin.as_mut() {
                pin.advance(hi);
            }
        }
        let n = max.min(self.pending.len());
        Ok(self.pending.split_to(n).freeze())
    }
}

/// Streams `snapshot` to a peer: `Begin`, `Data` chunks of at most `chunk_bytes`, `End`,
/// each sent with `call(body, wait)` once the previous one was acked. Returns the
/// receiver's vote from the answer to `End` (sent after its install).
pub async fn send<E, F, Fut>(
    group: GroupId,
    vote: Vote,
    snapshot: Snapshot<SnapshotData>,
    chunk_bytes: usize,
    mut call: F,
) -> std::result::Result<Vote, SendError<E>>
where
    F: FnMut(Bytes, Duration) -> Fut,
    Fut: Future<Output = std::result::Result<Bytes, E>>,
{
    let SnapshotData::Local(local) = snapshot.snapshot else {
        return Err(SendError::Source(format!(
            "group {group}: a staged snapshot cannot be sent (it is installed first)"
        )));
    };
    let Some(upto) = snapshot.meta.last_log_id.map(|l| l.index) else {
        return Err(SendError::Source(format!(
            "group {group}: a snapshot without a last log id"
        )));
    };
    if upto != local.upto {
        return Err(SendError::Source(format!(
            "group {group}: snapshot meta at {upto}, its data at {}",
            local.upto
        )));
    }
    // The checkpoint's pieces are pinned from here until read (a checkpoint written
    // meanwhile purges them only afterwards; one that already did fails the transfer
    // cleanly and openraft retries with the newer checkpoint).
    let section = local
        .checkpoint
        .open()
        .map_err(|e| SendError::Source(format!("group {group}: the snapshot's checkpoint: {e}")))?;
    let first = local
        .log
        .as_ref()
        .and_then(|l| l.retained_bounds().0)
        .filter(|f| *f <= upto);
    // Held from here until sent (a purge racing this line fails the transfer cleanly:
    // the entries are found missing and a new snapshot is sent).
    let pin = first.and_then(|f| local.log.as_ref().map(|l| l.pin_history(f)));
    let (entries_first, entries_count) = first.map_or((0, 0), |f| (f, upto - f + 1));
    let transfer = next_transfer();
    let chunk_bytes = chunk_bytes.max(1);
    let window = window_chunks(chunk_bytes);
    let check = |answer: std::result::Result<Bytes, E>, sent: u32| {
        let answer = answer.map_err(SendError::Rpc)?;
        let ack = decode_ack(&answer).map_err(|e| SendError::BadAck(e.to_string()))?;
        if ack.transfer != transfer || ack.seq != sent {
            return Err(SendError::BadAck(format!(
                "ack of chunk {} of transfer {:x}, sent chunk {sent} of {transfer:x}",
                ack.seq, ack.transfer
            )));
        }
        Ok(ack.vote)
    };
    let chunk = |seq: u32, body: ChunkBody| {
        encode_chunk(&StreamChunk {
            vote,
            transfer,
            seq,
            body,
        })
    };
    let begin = ChunkBody::Begin(Begin {
        meta: snapshot.meta.clone(),
        checkpoint_bytes: section.section_bytes(),
        rest_bytes: section.rest_bytes(),
        chunks: section.chunks(),
        entries_first,
        entries_count,
    });
    // `Begin` alone first: the receiver discards an older transfer's pieces on it, and a
    // refusal (an install in progress) is cheapest before any data is read.
    check(call(chunk(0, begin), CHUNK_WAIT).await, 0)?;
    let mut source = StreamSource {
        group,
        section: Some(section),
        log: local.log,
        pin,
        next: entries_first,
        upto: if entries_count == 0 { 0 } else { upto },
        pending: BytesMut::new(),
    };
    if entries_count == 0 {
        source.log = None;
    }
    // `Data` chunks with up to `window` unanswered (answers come back in any order on
    // the shared connection; `FuturesOrdered` checks them in the order sent).
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    let mut seq = 1u32;
    let mut offset = 0u64;
    let mut crc = crc32fast::Hasher::new();
    loop {
        while in_flight.len() >= window {
            let (answer, sent) = in_flight.next().await.expect("in flight");
            check(answer, sent)?;
        }
        let data = source
            .next_piece(chunk_bytes)
            .await
            .map_err(SendError::Source)?;
        if data.is_empty() {
            break;
        }
        crc.update(&data);
        let len = data.len() as u64;
        let sent = seq;
        let answer = call(chunk(sent, ChunkBody::Data { offset, data }), CHUNK_WAIT);
        in_flight.push_back(async move { (answer.await, sent) });
        seq += 1;
        offset += len;
    }
    while let Some((answer, sent)) = in_flight.next().await {
        check(answer, sent)?;
    }
    let end = ChunkBody::End {
        stream_bytes: offset,
        stream_crc: crc.finalize(),
    };
    check(call(chunk(seq, end), INSTALL_WAIT).await, seq)
}

/// Chunks of `chunk_bytes` the sender keeps unanswered: [`STREAM_WINDOW_BYTES`] worth,
/// at least one, at most [`STREAM_WINDOW_CHUNKS_MAX`].
pub fn window_chunks(chunk_bytes: usize) -> usize {
    (STREAM_WINDOW_BYTES / chunk_bytes.max(1)).clamp(1, STREAM_WINDOW_CHUNKS_MAX)
}

// ---------------------------------------------------------------------------------------
// Receiving: the staging log
// ---------------------------------------------------------------------------------------

/// Why a chunk was refused.
#[derive(Debug)]
pub enum ChunkError {
    /// The chunk is wrong (out of order, wrong total, bad checksum, …); the transfer is
    /// abandoned.
    BadRequest(String),
    /// The receiver cannot take it now (an install in progress, storage failed).
    Unavailable(String),
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::BadRequest(m) | ChunkError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// What a chunk led to.
#[derive(Debug)]
pub enum Received {
    /// Staged; acknowledge with this ack.
    Ack(StreamAck),
    /// The transfer is complete and checked: install it with `install_full_snapshot`,
    /// then call [`Staging::done_installing`].
    Complete {
        /// The sender's vote.
        vote: Vote,
        /// The snapshot to install.
        snapshot: Snapshot<SnapshotData>,
    },
}

/// One group's staging log, shared by every connection a snapshot may arrive on and by
/// the state machine that installs it (one per replica, made by the state machine).
pub struct Staging {
    engine: Arc<Engine>,
    group: GroupId,
    log: chatlog_storage::LogId,
    state: tokio::sync::Mutex<StagingState>,
    /// `(transfer, next seq)` of the transfer being received (`(0, 0)`: none), published
    /// after every chunk, so a chunk that arrived ahead of its turn waits for it.
    turn: tokio::sync::watch::Sender<(u64, u32)>,
    /// How long such a chunk waits ([`CHUNK_REORDER_WAIT`]; shorter in unit tests).
    reorder_wait: Duration,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct StagingState {
    receiving: Option<Receiving>,
    /// The transfer being installed: no `Begin` may touch the staging log meanwhile.
    installing: Option<u64>,
}

/// How far the staging writes of a transfer are durable (set by the engine's callbacks,
/// which run in submission order).
#[derive(Debug, Default)]
struct StageProgress {
    /// Staging batches found durable.
    durable: u64,
    /// The first staging write that failed.
    error: Option<String>,
}

/// A transfer in progress.
struct Receiving {
    transfer: u64,
    vote: Vote,
    begin: Begin,
    next_seq: u32,
    received: u64,
    crc: crc32fast::Hasher,
    first_piece: u64,
    next_piece: u64,
    /// The checkpoint's first bytes, for the header check.
    prefix: Vec<u8>,
    parser: RecordParser,
    /// Staging batches submitted; each chunk is acknowledged once submitted, and the
    /// transfer completes only once all of them are durable (one wait at `End`, not one
    /// fdatasync per chunk: the engine's group commit covers many chunks with one).
    submitted: u64,
    progress: Arc<tokio::sync::watch::Sender<StageProgress>>,
}

/// Follows the stream as it arrives: skips the checkpoint, checks each chunk record (its
/// chunk number next in order, its bytes against its CRC-32) and the entry records after
/// them (order and count). Holds at most one chunk head or one partial entry.
struct RecordParser {
    /// Checkpoint bytes still to come.
    rest_left: u64,
    /// Chunk records whose head has not arrived yet.
    chunks_left: u64,
    /// The chunk whose bytes are arriving.
    chunk: Option<ChunkArriving>,
    /// The last chunk number seen.
    last_k: Option<u64>,
    carry: Vec<u8>,
    /// Bytes of the range (the entry records) seen.
    entry_bytes: u64,
    next_index: u64,
    count_left: u64,
    last: Option<LogId>,
}

/// A chunk record whose bytes are arriving.
struct ChunkArriving {
    k: u64,
    left: u64,
    crc: u32,
    hasher: crc32fast::Hasher,
}

impl RecordParser {
    fn new(begin: &Begin) -> RecordParser {
        RecordParser {
            rest_left: begin.rest_bytes,
            chunks_left: begin.chunks,
            chunk: None,
            last_k: None,
            carry: Vec::new(),
            entry_bytes: 0,
            next_index: begin.entries_first,
            count_left: begin.entries_count,
            last: None,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> std::result::Result<(), String> {
        let n = (self.rest_left.min(data.len() as u64)) as usize;
        self.rest_left -= n as u64;
        data = &data[n..];
        while !data.is_empty() && (self.chunk.is_some() || self.chunks_left > 0) {
            if let Some(c) = self.chunk.as_mut() {
                let n = (c.left.min(data.len() as u64)) as usize;
                c.hasher.update(&data[..n]);
                c.left -= n as u64;
                data = &data[n..];
                if c.left == 0 {
                    self.end_chunk()?;
                }
                continue;
            }
            let n = (checkpoint_chunks::CHUNK_HEAD_BYTES - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.carry.len() < checkpoint_chunks::CHUNK_HEAD_BYTES {
                break;
            }
            let head: [u8; checkpoint_chunks::CHUNK_HEAD_BYTES] =
                self.carry[..].try_into().expect("a whole head");
            self.carry.clear();
            let (k, bytes, crc) = checkpoint_chunks::decode_chunk_head(&head);
            if let Some(prev) = self.last_k
                && Some(k) != prev.checked_add(1)
            {
                return Err(format!("index chunk {k} after chunk {prev}"));
            }
            self.last_k = Some(k);
            self.chunks_left -= 1;
            self.chunk = Some(ChunkArriving {
                k,
                left: bytes,
                crc,
                hasher: crc32fast::Hasher::new(),
            });
            if bytes == 0 {
                self.end_chunk()?;
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        self.entry_bytes += data.len() as u64;
        self.carry.extend_from_slice(data);
        let mut at = 0;
        loop {
            let rest = &self.carry[at..];
            if rest.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len > RECORD_BYTES_MAX {
                return Err(format!(
                    "an entry record of {len} bytes (at most {RECORD_BYTES_MAX})"
                ));
            }
            if rest.len() < 4 + len {
                break;
            }
            if self.count_left == 0 {
                return Err("more entries than the transfer announced".into());
            }
            let entry = codec::decode_entry(&Bytes::copy_from_slice(&rest[4..4 + len]))
                .map_err(|e| e.to_string())?;
            if entry.log_id.index != self.next_index {
                return Err(format!(
                    "entry {} where index {} was expected",
                    entry.log_id, self.next_index
                ));
            }
            self.next_index += 1;
            self.count_left -= 1;
            self.last = Some(entry.log_id);
            at += 4 + len;
        }
        self.carry.drain(..at);
        Ok(())
    }

    /// The chunk whose bytes all arrived: its CRC must match its head's.
    fn end_chunk(&mut self) -> std::result::Result<(), String> {
        let c = self.chunk.take().expect("a chunk arriving");
        let got = c.hasher.finalize();
        if got != c.crc {
            return Err(format!(
                "index chunk {} has CRC-32 {got:08x}, its record says {:08x}",
                c.k, c.crc
            ));
        }
        Ok(())
    }

    /// What is still missing at the stream's end, if anything.
    fn missing(&self) -> Option<String> {
        (self.rest_left > 0
            || self.chunks_left > 0
            || self.chunk.is_some()
            || !self.carry.is_empty()
            || self.count_left > 0)
            .then(|| {
                format!(
                    "{} checkpoint bytes, {} chunks ({} bytes of one), {} entries missing, {} \
                     bytes of a cut record",
                    self.rest_left,
                    self.chunks_left,
                    self.chunk.as_ref().map_or(0, |c| c.left),
                    self.count_left,
                    self.carry.len()
                )
            })
    }
}

impl Staging {
    /// The staging of group `group` in `engine` (`None` if the id is too large).
    pub fn new(engine: Arc<Engine>, group: GroupId) -> Option<Arc<Staging>> {
        Some(Arc::new(Staging {
            log: ids::staging_log(group)?,
            engine,
            group,
            state: tokio::sync::Mutex::new(StagingState::default()),
            turn: tokio::sync::watch::Sender::new((0, 0)),
            reorder_wait: CHUNK_REORDER_WAIT,
        }))
    }

    /// [`Staging::new`] with a chunk ahead of its turn waiting at most `reorder_wait`.
    #[cfg(test)]
    fn with_reorder_wait(
        engine: Arc<Engine>,
        group: GroupId,
        reorder_wait: Duration,
    ) -> Option<Arc<Staging>> {
        Some(Arc::new(Staging {
            log: ids::staging_log(group)?,
            engine,
            group,
            state: tokio::sync::Mutex::new(StagingState::default()),
            turn: tokio::sync::watch::Sender::new((0, 0)),
            reorder_wait,
        }))
    }

    /// Publishes whose turn it is (after any change of `st.receiving`).
    fn publish_turn(&self, st: &StagingState) {
        let turn = st
            .receiving
            .as_ref()
            .map_or((0, 0), |rx| (rx.transfer, rx.next_seq));
        self.turn.send_replace(turn);
    }

    /// Takes one chunk of a transfer. Chunks of the transfer being received that arrive
    /// ahead of their turn (at most [`STREAM_WINDOW_CHUNKS_MAX`] ahead) wait for it, at
    /// most `reorder_wait`.
    pub async fn receive(
        self: &Arc<Self>,
        chunk: StreamChunk,
    ) -> std::result::Result<Received, ChunkError> {
        let mut st = self.state.lock().await;
        loop {
            let ahead = st.receiving.as_ref().and_then(|rx| {
                (rx.transfer == chunk.transfer
                    && rx.vote == chunk.vote
                    && chunk.seq > rx.next_seq
                    && chunk.seq - rx.next_seq < STREAM_WINDOW_CHUNKS_MAX as u32)
                    .then_some(rx.transfer)
            });
            if ahead.is_none() || matches!(chunk.body, ChunkBody::Begin(_)) {
                break;
            }
            let mut turn = self.turn.subscribe();
            drop(st);
            let (transfer, seq) = (chunk.transfer, chunk.seq);
            let waited = tokio::time::timeout(
                self.reorder_wait,
                turn.wait_for(|&(t, s)| t != transfer || s >= seq),
            )
            .await
            .map(|_| ());
            st = self.state.lock().await;
            if waited.is_err() {
                // Its turn never came: refused below as out of order.
                break;
            }
        }
        let result = self.receive_in_turn(&mut st, chunk).await;
        self.publish_turn(&st);
        drop(st);
        if matches!(result, Ok(Received::Ack(ref ack)) if ack.seq > 0) {
            test_pause(self.group, "chunk staged").await;
        }
        result
    }

    fn storage(&self, verb: &'static str, subject: &str, source: chatlog_storage::Error) -> Error {
        Error::Storage {
            group: self.group,
            verb,
            subject: subject.to_string(),
            source,
        }
    }

    /// Takes the chunk whose turn it is (or refuses it).
    async fn receive_in_turn(
        self: &Arc<Self>,
        st: &mut StagingState,
        chunk: StreamChunk,
    ) -> std::result::Result<Received, ChunkError> {
        let group = self.group;
        if let ChunkBody::Begin(begin) = &chunk.body {
            if let Some(t) = st.installing {
                return Err(ChunkError::Unavailable(format!(
                    "group {group}: the snapshot of transfer {t:x} is being installed"
                )));
            }
            if chunk.seq != 0 {
                return Err(ChunkError::BadRequest(format!(
                    "group {group}: a Begin numbered {}",
                    chunk.seq
                )));
            }
            let Some(last) = begin.meta.last_log_id else {
                return Err(ChunkError::BadRequest(format!(
                    "group {group}: a snapshot without a last log id"
                )));
            };
            if begin.entries_count > 0
                && begin.entries_first.checked_add(begin.entries_count - 1) != Some(last.index)
            {
                return Err(ChunkError::BadRequest(format!(
                    "group {group}: {} entries from {} do not end at the snapshot's {last}",
                    begin.entries_count, begin.entries_first
                )));
            }
            let heads = begin
                .chunks
                .checked_mul(checkpoint_chunks::CHUNK_HEAD_BYTES as u64);
            if heads
                .and_then(|h| h.checked_add(begin.rest_bytes))
                .is_none_or(|least| least > begin.checkpoint_bytes)
            {
                return Err(ChunkError::BadRequest(format!(
                    "group {group}: a checkpoint section of {} bytes cannot hold {} bytes of \
                     checkpoint and {} chunk records",
                    begin.checkpoint_bytes, begin.rest_bytes, begin.chunks
                )));
            }
            // A new transfer replaces whatever was staged (an abandoned one).
            st.receiving = None;
            // Twice: an abandoned transfer's pieces may still be on their way to the
            // disk (acked once submitted), so the bounds seen before the first purge is
            // durable may be short of them; after it they are final.
            let mut next = 0;
            for _ in 0..2 {
                next = self.engine.bounds(self.log).map_or(1, |b| b.next.max(1));
                let mut batch = WriteBatch::new();
                batch.purge_before(self.log, next);
                self.engine.write(&batch).await.map_err(|e| {
                    ChunkError::Unavailable(
                        self.storage("purging", "staged snapshot pieces", e)
                            .to_string(),
                    )
                })?;
            }
            st.receiving = Some(Receiving {
                transfer: chunk.transfer,
                vote: chunk.vote,
                begin: begin.clone(),
                next_seq: 1,
                received: 0,
                crc: crc32fast::Hasher::new(),
                first_piece: next,
                next_piece: next,
                prefix: Vec::new(),
                parser: RecordParser::new(begin),
                submitted: 0,
                progress: Arc::new(tokio::sync::watch::Sender::new(StageProgress::default())),
            });
            tracing::info!(
                group,
                transfer = format_args!("{:x}", chunk.transfer),
                last = %last,
                checkpoint_bytes = begin.checkpoint_bytes,
                rest_bytes = begin.rest_bytes,
                chunks = begin.chunks,
                entries = begin.entries_count,
                "snapshot stream: receiving"
            );
            return Ok(Received::Ack(StreamAck {
                transfer: chunk.transfer,
                seq: 0,
                vote: chunk.vote,
            }));
        }
        let Some(rx) = st.receiving.as_mut() else {
            return Err(ChunkError::BadRequest(format!(
                "group {group}: chunk {} of transfer {:x} with no transfer started",
                chunk.seq, chunk.transfer
            )));
        };
        if rx.transfer != chunk.transfer || rx.vote != chunk.vote || rx.next_seq != chunk.seq {
            let message = format!(
                "group {group}: chunk {} of transfer {:x} from {}, expected chunk {} of {:x} \
                 from {}",
                chunk.seq, chunk.transfer, chunk.vote, rx.next_seq, rx.transfer, rx.vote
            );
            st.receiving = None;
            return Err(ChunkError::BadRequest(message));
        }
        let ack = StreamAck {
            transfer: chunk.transfer,
            seq: chunk.seq,
            vote: chunk.vote,
        };
        match chunk.body {
            ChunkBody::Begin(_) => unreachable!("handled above"),
            ChunkBody::Data { offset, data } => {
                if offset != rx.received {
                    let message = format!(
                        "group {group}: stream bytes at offset {offset}, expected offset {}",
                        rx.received
                    );
                    st.receiving = None;
                    return Err(ChunkError::BadRequest(message));
                }
                if let Err(e) = rx.parser.feed(&data) {
                    st.receiving = None;
                    return Err(ChunkError::BadRequest(format!("group {group}: {e}")));
                }
                let keep = (rx.begin.rest_bytes as usize).min(HEADER_PREFIX_BYTES_MAX);
                if rx.prefix.len() < keep {
                    let n = (keep - rx.prefix.len()).min(data.len());
                    rx.prefix.extend_from_slice(&data[..n]);
                }
                rx.crc.update(&data);
                rx.received += data.len() as u64;
                rx.next_seq += 1;
                let failed = rx.progress.borrow().error.clone();
                if let Some(e) = failed {
                    st.receiving = None;
                    return Err(ChunkError::Unavailable(format!(
                        "group {group}: staging the snapshot stream: {e}"
                    )));
                }
                let written = self.stage(rx.next_piece, &data, &rx.progress).await;
                match written {
                    Ok((next, batches)) => {
                        rx.next_piece = next;
                        rx.submitted += batches;
                    }
                    Err(e) => {
                        st.receiving = None;
                        return Err(ChunkError::Unavailable(e.to_string()));
                    }
                }
                if test_pausing() {
                    // Test hook: the "chunk staged" pause means staged on disk, so a
                    // SIGKILL inside it leaves pieces for the next start to discard.
                    // (A chunk is acknowledged once submitted; on a loaded machine it
                    // could still be queued when the pause began.)
                    let submitted = rx.submitted;
                    let _ = rx
                        .progress
                        .subscribe()
                        .wait_for(|p| p.durable >= submitted || p.error.is_some())
                        .await;
                }
                Ok(Received::Ack(ack))
            }
            ChunkBody::End {
                stream_bytes,
                stream_crc,
            } => {
                let rx = st.receiving.take().expect("checked above");
                let meta = rx.begin.meta.clone();
                let last = meta.last_log_id.expect("checked at Begin");
                let fail = |m: String| Err(ChunkError::BadRequest(format!("group {group}: {m}")));
                // The one wait for durability of the whole staged stream.
                let submitted = rx.submitted;
                let mut progress = rx.progress.subscribe();
                let staged = match progress
                    .wait_for(|p| p.durable >= submitted || p.error.is_some())
                    .await
                {
                    Ok(p) => p.error.clone(),
                    Err(_) => Some("the staging progress is gone".into()),
                };
                if let Some(e) = staged {
                    return Err(ChunkError::Unavailable(format!(
                        "group {group}: staging the snapshot stream: {e}"
                    )));
                }
                if stream_bytes != rx.received {
                    return fail(format!(
                        "the stream ends at {stream_bytes} bytes, {} arrived",
                        rx.received
                    ));
                }
                let crc = rx.crc.finalize();
                if crc != stream_crc {
                    return fail(format!(
                        "the stream's checksum is {crc:08x}, the sender's {stream_crc:08x}"
                    ));
                }
                if let Some(missing) = rx.parser.missing() {
                    return fail(format!("the stream ends early: {missing}"));
                }
                if rx.received != rx.begin.checkpoint_bytes + rx.parser.entry_bytes {
                    return fail(format!(
                        "the checkpoint section took {} bytes, Begin announced {}",
                        rx.received - rx.parser.entry_bytes,
                        rx.begin.checkpoint_bytes
                    ));
                }
                if rx.begin.entries_count > 0 && rx.parser.last != Some(last) {
                    return fail(format!(
                        "the range ends at {:?}, the snapshot at {last}",
                        rx.parser.last
                    ));
                }
                match crate::state_machine::checkpoint_header(&rx.prefix) {
                    Ok((applied, membership))
                        if applied == meta.last_log_id && membership == meta.last_membership => {}
                    Ok((applied, membership)) => {
                        return fail(format!(
                            "the checkpoint is at {applied:?} / {membership:?}, the meta says \
                             {meta}"
                        ));
                    }
                    Err(e) => return fail(format!("the checkpoint's header: {e}")),
                }
                st.installing = Some(rx.transfer);
                tracing::info!(
                    group,
                    transfer = format_args!("{:x}", rx.transfer),
                    chunks = rx.next_seq,
                    bytes = rx.received,
                    entries = rx.begin.entries_count,
                    "snapshot stream: received"
                );
                Ok(Received::Complete {
                    vote: rx.vote,
                    snapshot: Snapshot {
                        meta,
                        snapshot: SnapshotData::Staged(StagedSnapshot {
                            staging: Arc::clone(self),
                            layout: StagedLayout {
                                transfer: rx.transfer,
                                first_piece: rx.first_piece,
                                next_piece: rx.next_piece,
                                checkpoint_bytes: rx.begin.checkpoint_bytes,
                                rest_bytes: rx.begin.rest_bytes,
                                chunks: rx.begin.chunks,
                                entries_first: rx.begin.entries_first,
                                entries_count: rx.begin.entries_count,
                                last,
                            },
                        }),
                    },
                })
            }
        }
    }

    /// Ends the install of `transfer` (whether openraft installed it or not): a new
    /// transfer may start. Pieces openraft did not install (the snapshot was no newer
    /// than what the replica had) are deleted; with an intent present (an install that
    /// failed half way, which stopped the group) they stay for the next open to finish.
    pub async fn done_installing(&self, transfer: u64) {
        let mut st = self.state.lock().await;
        if st.installing != Some(transfer) {
            return;
        }
        st.installing = None;
        let leftover = self
            .engine
            .meta(self.log, ids::META_STAGED_INSTALL)
            .is_none()
            && self
                .engine
                .bounds(self.log)
                .is_some_and(|b| b.next > b.first);
        if leftover {
            let next = self.engine.bounds(self.log).map_or(1, |b| b.next);
            if let Err(e) = clear(&self.engine, self.group, self.log, next).await {
                tracing::warn!(group = self.group, error = %e, "snapshot stream: staged pieces not deleted");
            }
        }
    }

    /// Submits `data` as staging pieces from engine index `at` without waiting for
    /// their fdatasync (`progress` counts them durable); returns the next index and the
    /// batches submitted.
    async fn stage(
        &self,
        at: u64,
        data: &[u8],
        progress: &Arc<tokio::sync::watch::Sender<StageProgress>>,
    ) -> Result<(u64, u64)> {
        let batch_max = self.engine.write_batch_bytes_max();
        let piece = (batch_max / 4).max(1);
        let per_batch = (batch_max / 2 / piece).max(1);
        let pieces: Vec<&[u8]> = data.chunks(piece).collect();
        let mut next = at;
        let mut batches = 0;
        for group_of_pieces in pieces.chunks(per_batch) {
            let mut batch = WriteBatch::new();
            batch.append_many(self.log, next, group_of_pieces.iter().copied());
            let progress = Arc::clone(progress);
            let on_durable = Box::new(move |result: chatlog_storage::Result<()>| {
                progress.send_modify(|p| match result {
                    Ok(()) => p.durable += 1,
                    Err(e) => {
                        p.error.get_or_insert_with(|| e.to_string());
                    }
                });
            });
            self.engine
                .submit(&batch, on_durable)
                .await
                .map_err(|e| self.storage("staging", "snapshot stream pieces", e))?;
            next += group_of_pieces.len() as u64;
            batches += 1;
        }
        Ok((next, batches))
    }
}

// ---------------------------------------------------------------------------------------
// Installing
// ---------------------------------------------------------------------------------------

/// What the install intent says about the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntentCheckpoint {
    /// Written by chatlog before s9snap: the staged checkpoint is a whole one, written
    /// (again) at the roll-forward.
    Whole,
    /// The checkpoint's pieces are written and were loaded; the pointer to publish.
    Written(Unpublished),
}

/// The install intent (meta `ids::META_STAGED_INSTALL` of the staging log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Intent {
    layout: StagedLayout,
    /// Whether the range is written into the Raft log.
    write_range: bool,
    checkpoint: IntentCheckpoint,
}

/// The intent's bytes:
///
/// ```text
/// v1 (before s9snap)  1 u8 | transfer u64 | first_piece u64 | next_piece u64
///                     | checkpoint_bytes u64 | entries_first u64 | entries_count u64
///                     | last LogId | write_range u8
/// v2                  2 u8 | transfer u64 | first_piece u64 | next_piece u64
///                     | checkpoint_bytes u64 | rest_bytes u64 | chunks u64
///                     | entries_first u64 | entries_count u64 | last LogId
///                     | write_range u8 | pointer (checkpoint_chunks v2, 33 bytes)
///                     | keep_chunks_from u64
/// ```
fn encode_intent(intent: &Intent) -> Vec<u8> {
    let l = &intent.layout;
    let mut out = Vec::with_capacity(1 + 10 * 8 + codec::LOG_ID_BYTES + 1 + 33);
    match intent.checkpoint {
        IntentCheckpoint::Whole => {
            out.push(INTENT_WHOLE);
            for v in [
                l.transfer,
                l.first_piece,
                l.next_piece,
                l.checkpoint_bytes,
                l.entries_first,
                l.entries_count,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            codec::put_log_id(&mut out, &l.last);
            out.push(u8::from(intent.write_range));
        }
        IntentCheckpoint::Written(w) => {
            out.push(INTENT_WRITTEN);
            for v in [
                l.transfer,
                l.first_piece,
                l.next_piece,
                l.checkpoint_bytes,
                l.rest_bytes,
                l.chunks,
                l.entries_first,
                l.entries_count,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            codec::put_log_id(&mut out, &l.last);
            out.push(u8::from(intent.write_range));
            out.extend_from_slice(&w.pointer.encode());
            out.extend_from_slice(&w.keep_chunks_from.to_le_bytes());
        }
    }
    out
}

fn decode_intent(bytes: &[u8]) -> std::result::Result<Intent, DecodeError> {
    let mut r = Reader::new("snapshot install intent", bytes);
    let version = r.u8()?;
    let intent = match version {
        INTENT_WHOLE => {
            let (transfer, first_piece, next_piece, checkpoint_bytes) =
                (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let layout = StagedLayout {
                transfer,
                first_piece,
                next_piece,
                checkpoint_bytes,
                rest_bytes: checkpoint_bytes,
                chunks: 0,
                entries_first: r.u64()?,
                entries_count: r.u64()?,
                last: r.log_id()?,
            };
            Intent {
                layout,
                write_range: r.bool()?,
                checkpoint: IntentCheckpoint::Whole,
            }
        }
        INTENT_WRITTEN => {
            let layout = StagedLayout {
                transfer: r.u64()?,
                first_piece: r.u64()?,
                next_piece: r.u64()?,
                checkpoint_bytes: r.u64()?,
                rest_bytes: r.u64()?,
                chunks: r.u64()?,
                entries_first: r.u64()?,
                entries_count: r.u64()?,
                last: r.log_id()?,
            };
            let write_range = r.bool()?;
            let pointer = Pointer::decode(r.take(33)?)?;
            if !matches!(pointer, Pointer::Incremental { .. }) {
                return Err(r.error("a whole checkpoint's pointer"));
            }
            Intent {
                layout,
                write_range,
                checkpoint: IntentCheckpoint::Written(Unpublished {
                    pointer,
                    keep_chunks_from: r.u64()?,
                }),
            }
        }
        v => return Err(r.error(format!("version {v}"))),
    };
    r.finish()?;
    Ok(intent)
}

/// The copy mark (meta `ids::META_STAGED_COPY` of the staging log): where a received
/// checkpoint's pieces start in the checkpoint and chunk logs while they are written
/// and checked, before the intent: `version u8 (1) | checkpoint u64 | chunks u64`.
fn encode_copy_mark(from: PiecesFrom) -> Vec<u8> {
    let mut out = vec![COPY_MARK_VERSION];
    out.extend_from_slice(&from.checkpoint.to_le_bytes());
    out.extend_from_slice(&from.chunks.to_le_bytes());
    out
}

fn decode_copy_mark(bytes: &[u8]) -> std::result::Result<PiecesFrom, DecodeError> {
    let mut r = Reader::new("snapshot install copy mark", bytes);
    let version = r.u8()?;
    if version != COPY_MARK_VERSION {
        return Err(r.error(format!("version {version}")));
    }
    let from = PiecesFrom {
        checkpoint: r.u64()?,
        chunks: r.u64()?,
    };
    r.finish()?;
    Ok(from)
}

/// Reads a staged stream back in order (every piece checked by the engine's read).
struct StagedReader<'a> {
    engine: &'a Engine,
    group: GroupId,
    log: chatlog_storage::LogId,
    next_piece: u64,
    end_piece: u64,
    pieces: VecDeque<Bytes>,
}

impl StagedReader<'_> {
    fn missing(&self, what: String) -> Error {
        Error::Inconsistent {
            group: self.group,
            detail: format!("the staged snapshot stream ends early: {what}"),
        }
    }

    /// The next staged bytes, at most `max` (more pieces read when none is held).
    fn next(&mut self, max: usize) -> Result<Bytes> {
        loop {
            if let Some(mut piece) = self.pieces.pop_front() {
                if piece.len() > max {
                    self.pieces.push_front(piece.split_off(max));
                }
                if piece.is_empty() && max > 0 {
                    continue;
                }
                return Ok(piece);
            }
            if self.next_piece >= self.end_piece {
                return Err(self.missing(format!("piece {} is past its end", self.next_piece)));
            }
            let got = self
                .engine
                .read(
                    self.log,
                    self.next_piece..self.end_piece,
                    STAGING_READ_BYTES,
                )
                .map_err(|source| Error::Storage {
                    group: self.group,
                    verb: "reading",
                    subject: format!("staged snapshot pieces from {}", self.next_piece),
                    source,
                })?;
            if got.is_empty() {
                return Err(self.missing(format!("piece {} is gone", self.next_piece)));
            }
            self.next_piece += got.len() as u64;
            self.pieces.extend(got);
        }
    }

    /// Exactly `n` bytes of the stream.
    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let b = self.next(n - out.len())?;
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    /// Passes over `n` bytes of the stream (holding one piece at a time).
    fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            n -= self.next(n.min(STAGING_READ_BYTES as u64) as usize)?.len() as u64;
        }
        Ok(())
    }

    /// The next entries of the range, about `bytes_max` bytes of them, at most `left`.
    fn entries(&mut self, left: u64, bytes_max: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while (out.len() as u64) < left && bytes < bytes_max {
            let len = self.read_exact(4)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if len > RECORD_BYTES_MAX {
                return Err(self.missing(format!("an entry record of {len} bytes")));
            }
            let record = Bytes::from(self.read_exact(len)?);
            let entry = codec::decode_entry(&record).map_err(|source| Error::Decode {
                group: self.group,
                subject: "a staged snapshot entry".into(),
                source,
            })?;
            bytes += len;
            out.push(entry);
        }
        Ok(out)
    }
}

impl ByteSource for StagedReader<'_> {
    fn next_bytes(&mut self, max: usize) -> Result<Bytes> {
        self.next(max)
    }
}

impl StagedSnapshot {
    fn reader(&self) -> StagedReader<'_> {
        reader(
            &self.staging.engine,
            self.staging.group,
            self.staging.log,
            &self.layout,
        )
    }

    /// The staged checkpoint's first bytes, at most `max` (its header; the whole
    /// checkpoint is never read into one value).
    pub fn read_checkpoint_prefix(&self, max: usize) -> Result<Vec<u8>> {
        self.reader()
            .read_exact(max.min(self.layout.rest_bytes as usize))
    }

    /// The snapshot's last log id.
    pub fn last(&self) -> LogId {
        self.layout.last
    }

    /// Runs the install (module docs, "The install"): writes the staged checkpoint
    /// section as the replica's checkpoint pieces, has `load` load the state from them
    /// (`load` gets their pointer, not published yet, and checks what it loads), and only
    /// then writes the intent, publishes the pointer (sparing what `keeper` pins) and
    /// writes the range into `log` unless it already holds the last entry. Returns what
    /// `load` returned and the published pointer. Holds the staging for the whole install;
    /// the caller holds the group's checkpoint lock.
    pub async fn install<T>(
        &self,
        log: Option<&LogReader>,
        keeper: &Keeper,
        load: impl FnOnce(Pointer) -> Result<T>,
    ) -> Result<(T, Pointer)> {
        let staging = &self.staging;
        let group = staging.group;
        let engine = &*staging.engine;
        let st = staging.state.lock().await;
        if st.installing != Some(self.layout.transfer) {
            return Err(Error::Inconsistent {
                group,
                detail: format!(
                    "the staged snapshot of transfer {:x} is no longer staged",
                    self.layout.transfer
                ),
            });
        }
        let write_range =
            self.layout.entries_count > 0 && log.is_some_and(|l| !l.holds(self.layout.last));
        let mut reader = self.reader();
        let (written, loaded) = write_and_load(
            engine,
            group,
            &mut reader,
            self.layout.rest_bytes,
            self.layout.chunks,
            load,
        )
        .await?;
        let mut intent = WriteBatch::new();
        intent.put_meta(
            staging.log,
            ids::META_STAGED_INSTALL,
            &encode_intent(&Intent {
                layout: self.layout,
                write_range,
                checkpoint: IntentCheckpoint::Written(written),
            }),
        );
        engine
            .write(&intent)
            .await
            .map_err(|e| staging.storage("writing", "the snapshot install intent", e))?;
        test_pause(group, "install intent written").await;
        checkpoint_chunks::publish(
            engine,
            group,
            Some(keeper),
            written.pointer,
            written.keep_chunks_from,
        )
        .await?;
        test_pause(group, "install checkpoint written").await;
        if write_range && let Some(log) = log {
            // `reader` stands right after the checkpoint section.
            let mut left = self.layout.entries_count;
            log.install_staged(self.layout.entries_first, self.layout.last, || {
                let window = reader.entries(left, INSTALL_WINDOW_BYTES)?;
                left -= window.len() as u64;
                Ok(window)
            })
            .await?;
            test_pause(group, "install range written").await;
        }
        clear(engine, group, staging.log, self.layout.next_piece).await?;
        drop(st);
        tracing::info!(
            group,
            last = %self.layout.last,
            chunks = self.layout.chunks,
            entries = self.layout.entries_count,
            "snapshot stream: installed"
        );
        Ok((loaded, written.pointer))
    }
}

/// Steps 2 of the install (module docs): a copy mark, the checkpoint section read from
/// `source` written as group `group`'s checkpoint pieces (unpublished), and `load` run on
/// their pointer; if either fails, the pieces and the mark are dropped. Holds what
/// `write_section` holds. The caller holds the group's checkpoint lock.
async fn write_and_load<S: ByteSource, T>(
    engine: &Engine,
    group: GroupId,
    source: &mut S,
    rest_bytes: u64,
    chunks: u64,
    load: impl FnOnce(Pointer) -> Result<T>,
) -> Result<(Unpublished, T)> {
    let storage = |verb: &'static str, subject: &str, source| Error::Storage {
        group,
        verb,
        subject: subject.to_string(),
        source,
    };
    let staging_log = ids::staging_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    // Where the new pieces start, durable before any of them: a crash before the
    // intent drops them at the next open.
    let from = checkpoint_chunks::next_pieces(engine, group)?;
    let mut mark = WriteBatch::new();
    mark.put_meta(staging_log, ids::META_STAGED_COPY, &encode_copy_mark(from));
    engine
        .write(&mark)
        .await
        .map_err(|e| storage("writing", "the snapshot install copy mark", e))?;
    let written = checkpoint_chunks::write_section(engine, group, source, rest_bytes, chunks).await;
    test_pause(group, "install pieces written").await;
    // Loaded as a restart loads a checkpoint: every piece and chunk read back and
    // checked, the state decoded and compared with the meta.
    match written.and_then(|w| load(w.pointer).map(|t| (w, t))) {
        Ok(ok) => Ok(ok),
        Err(e) => {
            tracing::warn!(group, error = %e, "snapshot stream: the received checkpoint is refused; its pieces are dropped");
            checkpoint_chunks::discard_from(engine, group, from).await?;
            let mut unmark = WriteBatch::new();
            unmark.delete_meta(staging_log, ids::META_STAGED_COPY);
            engine
                .write(&unmark)
                .await
                .map_err(|e| storage("clearing", "the snapshot install copy mark", e))?;
            Err(e)
        }
    }
}

/// Installs another replica's checkpoint handed over in the same process (openraft's
/// storage conformance suite hands one state machine's snapshot to another; the
/// transport never does, it streams): its section copied into group `group`'s
/// checkpoint pieces in `engine`, loaded by `load`, then published (no range: the
/// snapshot's log is the other replica's). Crash-safe like a streamed install's
/// checkpoint part: a crash before the pointer drops the pieces at the next open.
/// Returns what `load` returned and the pointer. The caller holds the group's
/// checkpoint lock.
pub async fn install_copy<T>(
    engine: &Engine,
    group: GroupId,
    from: &CheckpointHandle,
    keeper: &Keeper,
    load: impl FnOnce(Pointer) -> Result<T>,
) -> Result<(T, Pointer)> {
    let mut section = from.open()?;
    let (rest_bytes, chunks) = (section.rest_bytes(), section.chunks());
    let mut source = SectionSource {
        group,
        section: &mut section,
        held: Bytes::new(),
    };
    let (written, loaded) =
        write_and_load(engine, group, &mut source, rest_bytes, chunks, load).await?;
    checkpoint_chunks::publish(
        engine,
        group,
        Some(keeper),
        written.pointer,
        written.keep_chunks_from,
    )
    .await?;
    let staging_log = ids::staging_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let mut unmark = WriteBatch::new();
    unmark.delete_meta(staging_log, ids::META_STAGED_COPY);
    engine
        .write(&unmark)
        .await
        .map_err(|source| Error::Storage {
            group,
            verb: "clearing",
            subject: "the snapshot install copy mark".into(),
            source,
        })?;
    Ok((loaded, written.pointer))
}

/// A [`SectionReader`] as a [`ByteSource`]: its parts cut to what is asked.
struct SectionSource<'a> {
    group: GroupId,
    section: &'a mut SectionReader,
    held: Bytes,
}

impl ByteSource for SectionSource<'_> {
    fn next_bytes(&mut self, max: usize) -> Result<Bytes> {
        if self.held.is_empty() {
            self.held = self.section.next_part()?;
            if self.held.is_empty() {
                return Err(Error::Inconsistent {
                    group: self.group,
                    detail: "a checkpoint section ends early".into(),
                });
            }
        }
        Ok(self.held.split_to(max.min(self.held.len())))
    }
}

fn reader<'a>(
    engine: &'a Engine,
    group: GroupId,
    log: chatlog_storage::LogId,
    layout: &StagedLayout,
) -> StagedReader<'a> {
    StagedReader {
        engine,
        group,
        log,
        next_piece: layout.first_piece,
        end_piece: layout.next_piece,
        pieces: VecDeque::new(),
    }
}

/// Deletes the intent, the copy mark and every staged piece below `next` in one batch.
async fn clear(
    engine: &Engine,
    group: GroupId,
    log: chatlog_storage::LogId,
    next: u64,
) -> Result<()> {
    let mut batch = WriteBatch::new();
    batch.delete_meta(log, ids::META_STAGED_INSTALL);
    batch.delete_meta(log, ids::META_STAGED_COPY);
    if engine.bounds(log).is_some_and(|b| b.next > b.first) {
        batch.purge_before(log, next.max(engine.bounds(log).map_or(1, |b| b.next)));
    }
    engine.write(&batch).await.map_err(|source| Error::Storage {
        group,
        verb: "clearing",
        subject: "the staged snapshot".into(),
        source,
    })
}

/// At open, before the group's log store and state machine read anything: finishes an
/// install a crash interrupted (an intent is present: publish the written checkpoint
/// again, or write a whole one an older version staged, then the range from the staged
/// stream, then clear), or drops what an install interrupted before its intent wrote
/// (the copy mark says from where) and the pieces of a transfer that never completed.
/// Returns whether an install was finished.
pub async fn finish_interrupted_install(engine: &Engine, group: GroupId) -> Result<bool> {
    let Some(log) = ids::staging_log(group) else {
        return Ok(false);
    };
    let Some(bytes) = engine.meta(log, ids::META_STAGED_INSTALL) else {
        if let Some(mark) = engine.meta(log, ids::META_STAGED_COPY) {
            let from = decode_copy_mark(&mark).map_err(|source| Error::Decode {
                group,
                subject: "the snapshot install copy mark".into(),
                source,
            })?;
            tracing::info!(
                group,
                "snapshot stream: dropping the checkpoint pieces of an install interrupted before its intent"
            );
            checkpoint_chunks::discard_from(engine, group, from).await?;
        }
        let pieces = engine.bounds(log).is_some_and(|b| b.next > b.first);
        if pieces {
            tracing::info!(
                group,
                "snapshot stream: deleting the pieces of an unfinished transfer"
            );
        }
        if pieces || engine.meta(log, ids::META_STAGED_COPY).is_some() {
            let next = engine.bounds(log).map_or(1, |b| b.next);
            clear(engine, group, log, next).await?;
        }
        return Ok(false);
    };
    let intent = decode_intent(&bytes).map_err(|source| Error::Decode {
        group,
        subject: "the snapshot install intent".into(),
        source,
    })?;
    let layout = intent.layout;
    tracing::warn!(
        group,
        last = %layout.last,
        entries = layout.entries_count,
        write_range = intent.write_range,
        "snapshot stream: finishing an install interrupted by a crash"
    );
    let mut r = reader(engine, group, log, &layout);
    match intent.checkpoint {
        IntentCheckpoint::Whole => {
            // Staged by an older version: its checkpoint is whole (and in memory once,
            // at this upgrade only).
            let checkpoint = r.read_exact(layout.checkpoint_bytes as usize)?;
            crate::state_machine::write_checkpoint_bytes(engine, group, &checkpoint).await?;
        }
        IntentCheckpoint::Written(w) => {
            checkpoint_chunks::publish(engine, group, None, w.pointer, w.keep_chunks_from).await?;
            if intent.write_range {
                r.skip(layout.checkpoint_bytes)?;
            }
        }
    }
    if intent.write_range {
        let mut left = layout.entries_count;
        crate::log_store::write_staged_range(
            engine,
            group,
            layout.entries_first,
            layout.last,
            || {
                let window = r.entries(left, INSTALL_WINDOW_BYTES)?;
                left -= window.len() as u64;
                Ok(window)
            },
        )
        .await?;
    }
    clear(engine, group, log, layout.next_piece).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Membership, log_id};

    fn meta(index: u64) -> SnapshotMeta {
        let voters: std::collections::BTreeSet<u64> = [1, 2, 3].into();
        let membership = Membership::new_with_defaults(vec![voters], []);
        SnapshotMeta {
            last_log_id: Some(log_id(2, 1, index)),
            last_membership: StoredMembership::new(Some(log_id(1, 1, 1)), membership),
        }
    }

    #[test]
    fn chunks_round_trip_and_refuse_damage() {
        let vote = Vote::new(3, 1);
        let chunks = [
            StreamChunk {
                vote,
                transfer: 7,
                seq: 0,
                body: ChunkBody::Begin(Begin {
                    meta: meta(99),
                    checkpoint_bytes: 1000,
                    rest_bytes: 900,
                    chunks: 2,
                    entries_first: 10,
                    entries_count: 90,
                }),
            },
            StreamChunk {
                vote,
                transfer: 7,
                seq: 1,
                body: ChunkBody::Data {
                    offset: 0,
                    data: Bytes::from_static(b"some stream bytes"),
                },
            },
            StreamChunk {
                vote,
                transfer: 7,
                seq: 2,
                body: ChunkBody::End {
                    stream_bytes: 17,
                    stream_crc: 0xdead_beef,
                },
            },
        ];
        for chunk in chunks {
            let bytes = encode_chunk(&chunk);
            assert_eq!(decode_chunk(&bytes), Ok(chunk));
            // Every flipped bit and every cut is refused (the CRC covers it all).
            for i in 0..bytes.len() {
                let mut bad = bytes.to_vec();
                bad[i] ^= 0x10;
                assert!(decode_chunk(&Bytes::from(bad)).is_err(), "flip at {i}");
                assert!(decode_chunk(&bytes.slice(..i)).is_err(), "cut at {i}");
            }
        }
        let ack = StreamAck {
            transfer: 9,
            seq: 4,
            vote,
        };
        assert_eq!(decode_ack(&encode_ack(&ack)), Ok(ack));
        assert!(decode_ack(&encode_ack(&ack)[1..]).is_err());
    }

    // ---- against real engines ----

    use crate::chat::GroupState;
    use crate::chat::index_chunks::CHUNK_ENTRIES;
    use crate::log_store::LogStore;
    use crate::state_machine::{ChatStateMachine, SmConfig};
    use crate::types::{ChatBatch, EntryPayload};
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};

    const GROUP: GroupId = 3;
    /// The sender's state and log: posts at Raft entries 3..=LAST, one per entry, so its
    /// index spans two whole chunks (0 and 1) and part of a third.
    const LAST: u64 = 2 * CHUNK_ENTRIES + 100;

    fn engine(dir: &std::path::Path) -> Arc<Engine> {
        let mut config = chatlog_storage::Config::new(dir);
        config.segment_bytes = 1 << 20;
        Arc::new(Engine::open(config).expect("engine opens"))
    }

    fn close(engine: Arc<Engine>) {
        let mut engine = engine;
        for _ in 0..500 {
            match Arc::try_unwrap(engine) {
                Ok(e) => {
                    e.close().expect("engine closes");
                    return;
                }
                Err(shared) => engine = shared,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the engine is still shared");
    }

    /// The log's entries 1..=n (their payloads are not chat batches: the state is made
    /// apart, [`state`]; only the bytes are compared).
    fn entries(n: u64) -> Vec<Entry> {
        (1..=n)
            .map(|i| Entry {
                log_id: log_id(2, 1, i),
                payload: EntryPayload::Normal(ChatBatch(Bytes::from(format!("entry {i}")))),
            })
            .collect()
    }

    /// A state applied through `last`: one user and chat, then one post per entry.
    fn state(last: u64) -> GroupState {
        let mut st = GroupState::new(GROUP);
        let (user, chat) = crate::chat::index_chunks::tests::user_and_chat(&mut st);
        for index in 3..=last {
            crate::chat::index_chunks::tests::post(&mut st, user, chat, index);
        }
        st
    }

    /// Checkpoint bytes with a real header for `meta` (only the header is checked when a
    /// stream arrives; the state is opaque to the staging).
    fn opaque_checkpoint(meta: &SnapshotMeta, state_bytes: usize) -> Bytes {
        let mut out = vec![crate::state_machine::SNAPSHOT_VERSION];
        put_opt_log_id(&mut out, meta.last_log_id.as_ref());
        put_opt_log_id(&mut out, meta.last_membership.log_id().as_ref());
        codec::put_membership(&mut out, meta.last_membership.membership());
        out.extend_from_slice(&(state_bytes as u64).to_le_bytes());
        out.extend((0..state_bytes).map(|i| i as u8));
        Bytes::from(out)
    }

    /// The stream of `rest`, the chunk records of `chunks` and `entries` (module docs).
    fn stream(rest: &[u8], chunks: &[(u64, &[u8])], entries: &[Entry]) -> Vec<u8> {
        let mut out = rest.to_vec();
        for (k, bytes) in chunks {
            out.extend_from_slice(&checkpoint_chunks::encode_chunk_head(
                *k,
                bytes.len() as u64,
                crc32fast::hash(bytes),
            ));
            out.extend_from_slice(bytes);
        }
        for e in entries {
            let b = codec::encode_entry(e);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&b);
        }
        out
    }

    /// A sender: its log holds `entries(LAST)` and its durable checkpoint is an
    /// incremental one of `state(LAST)` at `meta(LAST)`.
    struct Sender {
        engine: Arc<Engine>,
        _store: LogStore,
        reader: LogReader,
        state: GroupState,
        checkpoint: CheckpointHandle,
    }

    async fn sender(dir: &std::path::Path) -> Sender {
        let engine = engine(dir);
        let mut store = LogStore::open(Arc::clone(&engine), GROUP).expect("log store");
        store.blocking_append(entries(LAST)).await.expect("appends");
        let reader = store.get_log_reader().await;
        let state = state(LAST);
        crate::state_machine::write_incremental_checkpoint(&engine, GROUP, &meta(LAST), &state)
            .await
            .expect("the checkpoint is written");
        let checkpoint =
            CheckpointHandle::durable(Arc::clone(&engine), GROUP, Arc::new(Keeper::default()))
                .expect("reads the pointer")
                .expect("an incremental checkpoint");
        Sender {
            engine,
            _store: store,
            reader,
            state,
            checkpoint,
        }
    }

    /// A receiver's state machine over `engine`, with its log.
    async fn receiver(engine: &Arc<Engine>) -> (ChatStateMachine, LogStore, LogReader) {
        let mut store = LogStore::open(Arc::clone(engine), GROUP).expect("log store");
        let reader = store.get_log_reader().await;
        let sm = ChatStateMachine::open(Arc::clone(engine), GROUP, SmConfig::default())
            .expect("state machine opens")
            .with_log(reader.clone());
        (sm, store, reader)
    }

    /// Streams the sender's snapshot at `LAST` into `staging` through [`send`] with
    /// `chunk` bytes per chunk; returns the staged snapshot (or the send's error) and the
    /// number of chunks sent.
    async fn transfer(
        sender: &Sender,
        staging: &Arc<Staging>,
        chunk: usize,
    ) -> (std::result::Result<StagedSnapshot, SendError<String>>, u64) {
        let staged: Arc<std::sync::Mutex<Option<Snapshot<SnapshotData>>>> = Arc::default();
        let sent = Arc::new(AtomicU64::new(0));
        let call = |body: Bytes, _wait: Duration| {
            let (staging, staged, sent) =
                (Arc::clone(staging), Arc::clone(&staged), Arc::clone(&sent));
            async move {
                sent.fetch_add(1, Ordering::Relaxed);
                let chunk = decode_chunk(&body).map_err(|e| e.to_string())?;
                let (transfer, seq) = (chunk.transfer, chunk.seq);
                match staging.receive(chunk).await.map_err(|e| e.to_string())? {
                    Received::Ack(ack) => Ok::<Bytes, String>(encode_ack(&ack)),
                    Received::Complete { vote, snapshot } => {
                        *staged.lock().unwrap() = Some(snapshot);
                        Ok(encode_ack(&StreamAck {
                            transfer,
                            seq,
                            vote,
                        }))
                    }
                }
            }
        };
        let snapshot = Snapshot {
            meta: meta(LAST),
            snapshot: SnapshotData::Local(LocalSnapshot {
                checkpoint: sender.checkpoint.clone(),
                log: Some(sender.reader.clone()),
                upto: LAST,
            }),
        };
        let result = send(GROUP, Vote::new(1, 1), snapshot, chunk, call).await;
        let sent = sent.load(Ordering::Relaxed);
        let result = result.map(|vote| {
            assert_eq!(vote, Vote::new(1, 1));
            let snapshot = staged.lock().unwrap().take().expect("complete");
            assert_eq!(snapshot.meta, meta(LAST));
            let SnapshotData::Staged(staged) = snapshot.snapshot else {
                panic!("a staged snapshot")
            };
            staged
        });
        (result, sent)
    }

    /// The durable checkpoint of `engine`'s group, loaded as a restart loads it.
    fn loaded_state(engine: &Arc<Engine>) -> GroupState {
        let sm = ChatStateMachine::open(Arc::clone(engine), GROUP, SmConfig::default())
            .expect("the checkpoint loads");
        sm.shared().read().clone()
    }

    /// `(first, next)` of one of the group's logs.
    fn bounds(engine: &Engine, log: Option<chatlog_storage::LogId>) -> (u64, u64) {
        engine
            .bounds(log.expect("a log id"))
            .map_or((0, 0), |b| (b.first, b.next))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_streams_its_checkpoint_pieces_and_installs_them_as_the_receivers() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sender = sender(a.path()).await;
        let engine_b = engine(b.path());
        {
            let (mut sm, mut store_b, reader_b) = receiver(&engine_b).await;
            // The receiver's own log: a few entries of another leader, all replaced.
            store_b
                .blocking_append(
                    (1..=5)
                        .map(|i| Entry {
                            log_id: log_id(1, 2, i),
                            payload: EntryPayload::Blank,
                        })
                        .collect::<Vec<_>>(),
                )
                .await
                .unwrap();
            let staging = sm.staging().expect("a staging log");
            // A transfer whose sender vanished half way: staged bytes, never completed.
            // The next Begin discards them.
            let abandoned = StreamChunk {
                vote: Vote::new(1, 3),
                transfer: 99,
                seq: 0,
                body: ChunkBody::Begin(Begin {
                    meta: meta(LAST),
                    checkpoint_bytes: 10,
                    rest_bytes: 10,
                    chunks: 0,
                    entries_first: 0,
                    entries_count: 0,
                }),
            };
            staging.receive(abandoned).await.expect("begins");
            let garbage = StreamChunk {
                vote: Vote::new(1, 3),
                transfer: 99,
                seq: 1,
                body: ChunkBody::Data {
                    offset: 0,
                    data: Bytes::from_static(b"garbage"),
                },
            };
            staging.receive(garbage).await.expect("staged");
            let chunk = 16 << 10;
            let (staged, chunks) = transfer(&sender, &staging, chunk).await;
            let staged = staged.expect("the transfer succeeds");
            assert_eq!(staged.layout.chunks, 2, "chunks 0 and 1");
            let section = staged.layout.checkpoint_bytes;
            let whole = sender.state.encode().len() as u64;
            assert!(
                staged.layout.rest_bytes < whole / 4,
                "the checkpoint proper ({} bytes) leaves the chunks out (whole state {whole})",
                staged.layout.rest_bytes
            );
            assert!(
                section > whole / 2,
                "the chunks are in the section: {section}"
            );
            let range = stream(&[], &[], &entries(LAST)).len() as u64;
            assert_eq!(
                chunks,
                2 + (section + range).div_ceil(chunk as u64),
                "Begin, Data…, End"
            );
            let transfer_id = staged.layout.transfer;
            sm.install_snapshot(&meta(LAST), SnapshotData::Staged(staged))
                .await
                .expect("installs");
            staging.done_installing(transfer_id).await;
            assert!(
                sm.shared().read().clone() == sender.state,
                "the installed state is the sender's"
            );
            assert_eq!(reader_b.read_history(0, LAST + 1).unwrap(), entries(LAST));
            // Written as this replica's incremental checkpoint: its own chunks, its own
            // directory; what the snapshot hands on is that checkpoint, by pointer.
            let (_, pointer) =
                CheckpointHandle::durable(Arc::clone(&engine_b), GROUP, Arc::default())
                    .unwrap()
                    .map(|h| ((), h.pointer()))
                    .expect("an incremental checkpoint");
            assert!(matches!(pointer, Pointer::Incremental { .. }));
            let (first, next) = bounds(&engine_b, ids::index_chunk_log(GROUP));
            assert!(next > first, "the chunks are in the receiver's chunk log");
            let current = sm
                .get_current_snapshot()
                .await
                .unwrap()
                .expect("a snapshot");
            assert_eq!(current.meta, meta(LAST));
            let SnapshotData::Local(local) = current.snapshot else {
                panic!("a local snapshot")
            };
            assert_eq!(local.checkpoint.pointer(), pointer);
            let log = ids::staging_log(GROUP).unwrap();
            assert!(engine_b.meta(log, ids::META_STAGED_INSTALL).is_none());
            assert!(engine_b.meta(log, ids::META_STAGED_COPY).is_none());
            assert!(engine_b.bounds(log).is_none_or(|b| b.next == b.first));
        }
        // A restart loads the installed checkpoint.
        assert!(
            loaded_state(&engine_b) == sender.state,
            "after a restart too"
        );
        close(engine_b);
    }

    /// The receiver's old state, before a snapshot: a checkpoint of a smaller state and
    /// a log of its own. Returns the old state.
    async fn old_receiver_state(engine_b: &Arc<Engine>) -> GroupState {
        let old = state(CHUNK_ENTRIES + 10);
        crate::state_machine::write_incremental_checkpoint(
            engine_b,
            GROUP,
            &meta(CHUNK_ENTRIES + 10),
            &old,
        )
        .await
        .unwrap();
        old
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_install_interrupted_after_its_intent_is_finished_at_open() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sender = sender(a.path()).await;
        {
            let engine_b = engine(b.path());
            let old = old_receiver_state(&engine_b).await;
            assert!(loaded_state(&engine_b) == old);
            let staging = Staging::new(Arc::clone(&engine_b), GROUP).unwrap();
            let (staged, _) = transfer(&sender, &staging, 64 << 10).await;
            let staged = staged.expect("the transfer succeeds");
            // The install's first steps, then a crash: pieces, intent, and half of the
            // range are durable; the pointer is not published.
            let mut reader = staged.reader();
            let written = checkpoint_chunks::write_section(
                &engine_b,
                GROUP,
                &mut reader,
                staged.layout.rest_bytes,
                staged.layout.chunks,
            )
            .await
            .expect("the pieces are written");
            let mut intent = WriteBatch::new();
            intent.put_meta(
                staging.log,
                ids::META_STAGED_INSTALL,
                &encode_intent(&Intent {
                    layout: staged.layout,
                    write_range: true,
                    checkpoint: IntentCheckpoint::Written(written),
                }),
            );
            engine_b.write(&intent).await.unwrap();
            let mut half = Some(entries(LAST / 2));
            let cut = crate::log_store::write_staged_range(
                &engine_b,
                GROUP,
                1,
                log_id(2, 1, LAST),
                || Ok(half.take().unwrap_or_default()),
            )
            .await;
            assert!(cut.is_err(), "a range that stops short is refused: {cut:?}");
            assert!(
                loaded_state(&engine_b) == old,
                "the pointer is not published: the old state loads"
            );
            drop((staging, staged));
            close(engine_b);
        }
        let engine_b = engine(b.path());
        assert!(finish_interrupted_install(&engine_b, GROUP).await.unwrap());
        assert!(!finish_interrupted_install(&engine_b, GROUP).await.unwrap());
        let mut store_b = LogStore::open(Arc::clone(&engine_b), GROUP).expect("log store");
        let reader_b = store_b.get_log_reader().await;
        assert_eq!(reader_b.read_history(0, LAST + 1).unwrap(), entries(LAST));
        let state = store_b.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(2, 1, LAST)));
        assert!(
            loaded_state(&engine_b) == sender.state,
            "the new state loads"
        );
        drop((reader_b, store_b));
        close(engine_b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_install_interrupted_before_its_intent_leaves_the_old_state() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sender = sender(a.path()).await;
        let (old, chunk_log_before, cp_log_before) = {
            let engine_b = engine(b.path());
            let old = old_receiver_state(&engine_b).await;
            let chunks_before = bounds(&engine_b, ids::index_chunk_log(GROUP));
            let cp_before = bounds(&engine_b, ids::checkpoint_log(GROUP));
            let staging = Staging::new(Arc::clone(&engine_b), GROUP).unwrap();
            // Staged completely, then the install wrote its copy mark and the pieces of
            // the new checkpoint, and the power went before its intent.
            let (staged, _) = transfer(&sender, &staging, 64 << 10).await;
            let staged = staged.expect("the transfer succeeds");
            let from = checkpoint_chunks::next_pieces(&engine_b, GROUP).unwrap();
            let mut mark = WriteBatch::new();
            mark.put_meta(staging.log, ids::META_STAGED_COPY, &encode_copy_mark(from));
            engine_b.write(&mark).await.unwrap();
            checkpoint_chunks::write_section(
                &engine_b,
                GROUP,
                &mut staged.reader(),
                staged.layout.rest_bytes,
                staged.layout.chunks,
            )
            .await
            .expect("the pieces are written");
            assert!(bounds(&engine_b, ids::index_chunk_log(GROUP)).1 > chunks_before.1);
            drop((staging, staged));
            close(engine_b);
            (old, chunks_before, cp_before)
        };
        let engine_b = engine(b.path());
        assert!(!finish_interrupted_install(&engine_b, GROUP).await.unwrap());
        assert!(loaded_state(&engine_b) == old, "the old state loads");
        assert_eq!(
            bounds(&engine_b, ids::index_chunk_log(GROUP)),
            chunk_log_before,
            "the new chunks are dropped"
        );
        assert_eq!(
            bounds(&engine_b, ids::checkpoint_log(GROUP)),
            cp_log_before,
            "the new checkpoint pieces are dropped"
        );
        let log = ids::staging_log(GROUP).unwrap();
        assert!(engine_b.meta(log, ids::META_STAGED_COPY).is_none());
        assert!(
            engine_b.bounds(log).is_none_or(|b| b.next == b.first),
            "staged pieces deleted"
        );
        close(engine_b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_received_checkpoint_that_does_not_load_is_refused_and_dropped() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sender = sender(a.path()).await;
        let engine_b = engine(b.path());
        let old = old_receiver_state(&engine_b).await;
        let chunks_before = bounds(&engine_b, ids::index_chunk_log(GROUP));
        {
            let (mut sm, _store, _reader) = receiver(&engine_b).await;
            let staging = sm.staging().expect("a staging log");
            let (staged, _) = transfer(&sender, &staging, 64 << 10).await;
            let staged = staged.expect("the transfer succeeds");
            // Meta that the checkpoint does not match (another membership).
            let mut wrong = meta(LAST);
            wrong.last_membership = StoredMembership::new(
                Some(log_id(1, 1, 2)),
                wrong.last_membership.membership().clone(),
            );
            let err = sm
                .install_snapshot(&wrong, SnapshotData::Staged(staged))
                .await
                .expect_err("refused");
            assert!(err.to_string().contains("its meta says"), "{err}");
            assert!(sm.shared().read().clone() == old, "the state is unchanged");
        }
        assert_eq!(
            bounds(&engine_b, ids::index_chunk_log(GROUP)),
            chunks_before,
            "the received chunks are dropped"
        );
        assert!(loaded_state(&engine_b) == old, "the old state loads");
        close(engine_b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_whose_chunk_does_not_match_its_directory_fails_the_transfer() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sender = sender(a.path()).await;
        // A chunk piece whose bytes changed while its record stays valid for the engine
        // (rewritten in place): only the directory's CRC-32 can tell.
        let Pointer::Incremental { .. } = sender.checkpoint.pointer() else {
            panic!("incremental")
        };
        let chunk_log = ids::index_chunk_log(GROUP).unwrap();
        let (first, _) = bounds(&sender.engine, Some(chunk_log));
        let mut piece = sender.engine.get(chunk_log, first).unwrap().to_vec();
        let at = piece.len() / 2;
        piece[at] ^= 0x40;
        let mut redact = WriteBatch::new();
        redact.redact(chunk_log, first, &piece);
        sender.engine.write(&redact).await.unwrap();
        let engine_b = engine(b.path());
        let staging = Staging::new(Arc::clone(&engine_b), GROUP).unwrap();
        let (result, _) = transfer(&sender, &staging, 64 << 10).await;
        match result {
            Err(SendError::Source(m)) => assert!(
                m.contains("index chunk 0") && m.contains("damaged"),
                "the error names the chunk: {m}"
            ),
            Err(other) => panic!("expected a source error, got {other:?}"),
            Ok(_) => panic!("a damaged checkpoint was sent"),
        }
        drop(staging);
        close(engine_b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_reading_a_damaged_chunk_from_disk_fails_with_the_read_error() {
        use chatlog_storage::fault::FaultyFileSystem;
        let dir = tempfile::tempdir().unwrap();
        {
            let sender = sender(dir.path()).await;
            drop(sender.checkpoint);
            drop((sender._store, sender.reader));
            // An empty active segment: the reopen replays nothing, so every read after
            // it is one the test makes.
            sender.engine.rotate_blocking().expect("rotates");
            close(sender.engine);
        }
        let fs = FaultyFileSystem::new();
        let mut config = chatlog_storage::Config::new(dir.path());
        config.segment_bytes = 1 << 20;
        let engine = Arc::new(Engine::open_with(config, Arc::new(fs.clone())).unwrap());
        let handle = CheckpointHandle::durable(Arc::clone(&engine), GROUP, Arc::default())
            .unwrap()
            .expect("an incremental checkpoint");
        let mut section = handle.open().expect("opens");
        // The checkpoint proper, then the first chunk's head: no chunk bytes read yet.
        let mut read = 0;
        while read < section.rest_bytes() {
            read += section.next_part().expect("a checkpoint piece").len() as u64;
        }
        assert_eq!(
            section.next_part().expect("the head").len(),
            checkpoint_chunks::CHUNK_HEAD_BYTES
        );
        // The next disk read returns a flipped bit.
        fs.plan()
            .flip_read_after
            .store(0, std::sync::atomic::Ordering::SeqCst);
        let err = section.next_part().expect_err("a damaged piece was read");
        assert!(err.is_damage(), "{err:?}");
        assert!(
            err.to_string().contains("index chunk 0"),
            "the error names what was read: {err}"
        );
        drop((section, handle));
        close(engine);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_being_sent_is_not_purged_until_sent() {
        let dir = tempfile::tempdir().unwrap();
        let sender = sender(dir.path()).await;
        let keeper = Arc::new(Keeper::default());
        let handle = CheckpointHandle::new(
            Arc::clone(&sender.engine),
            GROUP,
            sender.checkpoint.pointer(),
            Arc::clone(&keeper),
        );
        let section = handle.open().expect("opens");
        let cp_log = ids::checkpoint_log(GROUP);
        let chunk_log = ids::index_chunk_log(GROUP);
        let (cp_first, _) = bounds(&sender.engine, cp_log);
        let (chunk_first, _) = bounds(&sender.engine, chunk_log);
        // A newer checkpoint whose region starts higher (retention moved): it would
        // purge every old piece and chunk, but spares the pinned ones.
        let mut newer = sender.state.clone();
        newer.trim_below(2 * CHUNK_ENTRIES);
        let write_newer = async || {
            let plan = checkpoint_chunks::plan(
                &sender.engine,
                GROUP,
                &newer,
                LAST,
                &mut Default::default(),
                |rest| rest.to_vec(),
            )
            .unwrap();
            checkpoint_chunks::write(&sender.engine, GROUP, plan, &keeper)
                .await
                .unwrap();
        };
        write_newer().await;
        assert_eq!(bounds(&sender.engine, cp_log).0, cp_first, "pinned");
        assert_eq!(bounds(&sender.engine, chunk_log).0, chunk_first, "pinned");
        // Another transfer of it may still start: its pieces are still spared.
        drop(handle.open().expect("not purged"));
        drop(section);
        write_newer().await;
        assert!(
            bounds(&sender.engine, cp_log).0 > cp_first,
            "purged once sent"
        );
        assert!(
            bounds(&sender.engine, chunk_log).0 > chunk_first,
            "purged once sent"
        );
        // A transfer of the old checkpoint now is refused, naming the way out.
        let late = handle.open().expect_err("purged");
        assert!(
            late.to_string().contains("a new snapshot will be sent"),
            "{late}"
        );
        drop(handle);
        drop(sender.checkpoint);
        drop((sender._store, sender.reader));
        close(sender.engine);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_receiver_refuses_chunks_out_of_order_wrong_totals_and_bad_entries() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let staging =
            Staging::with_reorder_wait(Arc::clone(&engine), GROUP, Duration::from_millis(200))
                .unwrap();
        let vote = Vote::new(4, 1);
        let meta = meta(20);
        let cp = opaque_checkpoint(&meta, 100);
        let good: Vec<Entry> = (11..=20)
            .map(|i| Entry {
                log_id: log_id(2, 1, i),
                payload: EntryPayload::Blank,
            })
            .collect();
        // A checkpoint section of `cp` and two chunk records (opaque here: only their
        // CRC is checked as they arrive).
        let (c3, c4) = (vec![3u8; 700], vec![4u8; 300]);
        let chunks: [(u64, &[u8]); 2] = [(3, &c3), (4, &c4)];
        let section = stream(&cp, &chunks, &[]).len() as u64;
        let begin = |transfer: u64, count: u64| StreamChunk {
            vote,
            transfer,
            seq: 0,
            body: ChunkBody::Begin(Begin {
                meta: meta.clone(),
                checkpoint_bytes: section,
                rest_bytes: cp.len() as u64,
                chunks: 2,
                entries_first: 11,
                entries_count: count,
            }),
        };
        let data = |transfer: u64, seq: u32, offset: u64, bytes: &[u8]| StreamChunk {
            vote,
            transfer,
            seq,
            body: ChunkBody::Data {
                offset,
                data: Bytes::copy_from_slice(bytes),
            },
        };
        let end = |transfer: u64, seq: u32, stream_bytes: u64, stream_crc: u32| StreamChunk {
            vote,
            transfer,
            seq,
            body: ChunkBody::End {
                stream_bytes,
                stream_crc,
            },
        };
        let refused = async |chunk: StreamChunk, what: &str| match staging.receive(chunk).await {
            Err(ChunkError::BadRequest(m)) => assert!(m.contains(what), "{m:?} names {what:?}"),
            other => panic!("expected a refusal naming {what:?}, got {other:?}"),
        };
        let acked = async |chunk: StreamChunk| match staging.receive(chunk).await {
            Ok(Received::Ack(_)) => {}
            other => panic!("expected an ack, got {other:?}"),
        };
        let all = stream(&cp, &chunks, &good);
        let crc = crc32fast::hash(&all);

        // A chunk with no transfer started.
        refused(data(1, 1, 0, &all[..10]), "no transfer started").await;
        // Out of order: chunk 2 before chunk 1, and chunk 1 never comes: chunk 2 waits
        // its turn, then is refused; the transfer is then abandoned.
        acked(begin(2, 10)).await;
        refused(data(2, 2, 0, &all[..10]), "expected chunk 1").await;
        refused(data(2, 1, 0, &all[..10]), "no transfer started").await;
        // Too far ahead of its turn (beyond any window): refused at once.
        acked(begin(20, 10)).await;
        let far = 1 + STREAM_WINDOW_CHUNKS_MAX as u32;
        refused(data(20, far, 0, &all[..10]), "expected chunk 1").await;
        // Chunks in flight that arrive out of order are taken in order: chunk 2 waits
        // for chunk 1, both are acked, and the transfer completes.
        acked(begin(21, 10)).await;
        let (second, first) = tokio::join!(staging.receive(data(21, 2, 50, &all[50..])), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            staging.receive(data(21, 1, 0, &all[..50])).await
        });
        assert!(matches!(first, Ok(Received::Ack(_))), "{first:?}");
        assert!(matches!(second, Ok(Received::Ack(_))), "{second:?}");
        match staging.receive(end(21, 3, all.len() as u64, crc)).await {
            Ok(Received::Complete { .. }) => {}
            other => panic!("expected the transfer complete, got {other:?}"),
        }
        staging.done_installing(21).await;
        // A wrong offset.
        acked(begin(3, 10)).await;
        refused(data(3, 1, 5, &all[..10]), "expected offset 0").await;
        // Another vote, another transfer.
        acked(begin(4, 10)).await;
        let mut other_vote = data(4, 1, 0, &all[..10]);
        other_vote.vote = Vote::new(5, 2);
        refused(other_vote, "expected chunk 1 of 4").await;
        acked(begin(5, 10)).await;
        refused(data(6, 1, 0, &all[..10]), "expected chunk 1 of 5").await;
        // A wrong total, a wrong checksum, fewer entries than announced.
        for (transfer, total, sum, count, what) in [
            (7, all.len() as u64 + 1, crc, 10, "arrived"),
            (8, all.len() as u64, crc ^ 1, 10, "checksum"),
            (9, all.len() as u64, crc, 11, "do not end at"),
        ] {
            if count == 11 {
                // 11 entries from 11 cannot end at 20: refused at Begin already.
                refused(begin(transfer, count), what).await;
                continue;
            }
            acked(begin(transfer, count)).await;
            acked(data(transfer, 1, 0, &all)).await;
            refused(end(transfer, 2, total, sum), what).await;
        }
        let short = stream(&cp, &chunks, &good[..9]);
        acked(begin(10, 10)).await;
        acked(data(10, 1, 0, &short)).await;
        refused(
            end(10, 2, short.len() as u64, crc32fast::hash(&short)),
            "ends early",
        )
        .await;
        // Entries out of order.
        let mut swapped = good.clone();
        swapped.swap(3, 4);
        acked(begin(11, 10)).await;
        refused(
            data(11, 1, 0, &stream(&cp, &chunks, &swapped)),
            "was expected",
        )
        .await;
        // A chunk whose bytes do not match its record's CRC-32, chunks out of order, and
        // a section that does not end where Begin said.
        let mut bad_chunk = stream(&cp, &chunks, &good);
        let at = cp.len() + checkpoint_chunks::CHUNK_HEAD_BYTES + 10;
        bad_chunk[at] ^= 1;
        acked(begin(15, 10)).await;
        refused(data(15, 1, 0, &bad_chunk), "index chunk 3 has CRC-32").await;
        acked(begin(16, 10)).await;
        refused(
            data(16, 1, 0, &stream(&cp, &[(3, &c3), (5, &c4)], &good)),
            "index chunk 5 after chunk 3",
        )
        .await;
        let longer = StreamChunk {
            vote,
            transfer: 17,
            seq: 0,
            body: ChunkBody::Begin(Begin {
                meta: meta.clone(),
                checkpoint_bytes: section + 8,
                rest_bytes: cp.len() as u64,
                chunks: 2,
                entries_first: 11,
                entries_count: 10,
            }),
        };
        acked(longer).await;
        acked(data(17, 1, 0, &all)).await;
        refused(
            end(17, 2, all.len() as u64, crc),
            "the checkpoint section took",
        )
        .await;
        let too_small = StreamChunk {
            vote,
            transfer: 18,
            seq: 0,
            body: ChunkBody::Begin(Begin {
                meta: meta.clone(),
                checkpoint_bytes: cp.len() as u64 + 39,
                rest_bytes: cp.len() as u64,
                chunks: 2,
                entries_first: 11,
                entries_count: 10,
            }),
        };
        refused(too_small, "cannot hold").await;
        // A checkpoint whose header is not the meta's.
        let wrong = stream(&opaque_checkpoint(&self::meta(19), 100), &chunks, &good);
        acked(begin(12, 10)).await;
        acked(data(12, 1, 0, &wrong)).await;
        refused(
            end(12, 2, wrong.len() as u64, crc32fast::hash(&wrong)),
            "the meta says",
        )
        .await;
        // A good transfer in two chunks completes; a Begin during its install waits its
        // turn (refused as unavailable), after it goes ahead.
        acked(begin(13, 10)).await;
        acked(data(13, 1, 0, &all[..50])).await;
        acked(data(13, 2, 50, &all[50..])).await;
        match staging.receive(end(13, 3, all.len() as u64, crc)).await {
            Ok(Received::Complete { .. }) => {}
            other => panic!("expected the transfer complete, got {other:?}"),
        }
        match staging.receive(begin(14, 10)).await {
            Err(ChunkError::Unavailable(m)) => assert!(m.contains("being installed"), "{m}"),
            other => panic!("expected unavailable, got {other:?}"),
        }
        staging.done_installing(13).await;
        acked(begin(14, 10)).await;
        drop(staging);
        close(engine);
    }

    #[test]
    fn intent_round_trips() {
        let layout = StagedLayout {
            transfer: 1,
            first_piece: 2,
            next_piece: 3,
            checkpoint_bytes: 4,
            rest_bytes: 3,
            chunks: 0,
            entries_first: 5,
            entries_count: 6,
            last: log_id(7, 8, 10),
        };
        let written = Unpublished {
            pointer: Pointer::Incremental {
                first: 11,
                count: 2,
                checkpoint: 3,
                directory: 8,
            },
            keep_chunks_from: 12,
        };
        for write_range in [false, true] {
            for checkpoint in [IntentCheckpoint::Whole, IntentCheckpoint::Written(written)] {
                let mut layout = layout;
                if checkpoint == IntentCheckpoint::Whole {
                    // A whole checkpoint is the whole section.
                    (layout.rest_bytes, layout.chunks) = (layout.checkpoint_bytes, 0);
                }
                let intent = Intent {
                    layout,
                    write_range,
                    checkpoint,
                };
                assert_eq!(decode_intent(&encode_intent(&intent)), Ok(intent));
            }
        }
        assert!(decode_intent(&[3]).is_err());
        // An intent written before s9snap (v1) still decodes: a whole staged checkpoint.
        let mut v1 = vec![1u8];
        for v in [1u64, 2, 3, 4, 5, 6] {
            v1.extend_from_slice(&v.to_le_bytes());
        }
        codec::put_log_id(&mut v1, &log_id(7, 8, 10));
        v1.push(1);
        let old = decode_intent(&v1).expect("decodes");
        assert_eq!(old.checkpoint, IntentCheckpoint::Whole);
        assert_eq!((old.layout.rest_bytes, old.layout.chunks), (4, 0));
        assert!(old.write_range);
        let mark = PiecesFrom {
            checkpoint: 9,
            chunks: 10,
        };
        assert_eq!(decode_copy_mark(&encode_copy_mark(mark)), Ok(mark));
    }

    #[test]
    fn a_begin_of_the_whole_checkpoint_format_is_refused_by_name() {
        let mut begin = encode_chunk(&StreamChunk {
            vote: Vote::new(1, 1),
            transfer: 1,
            seq: 0,
            body: ChunkBody::Begin(Begin {
                meta: meta(5),
                checkpoint_bytes: 10,
                rest_bytes: 10,
                chunks: 0,
                entries_first: 0,
                entries_count: 0,
            }),
        })
        .to_vec();
        // The kind byte: after the vote, the transfer and the seq.
        let at = codec::VOTE_BYTES + 12;
        assert_eq!(begin[at], KIND_BEGIN);
        begin[at] = KIND_BEGIN_WHOLE;
        let n = begin.len() - 4;
        let crc = crc32fast::hash(&begin[..n]);
        begin[n..].copy_from_slice(&crc.to_le_bytes());
        let err = decode_chunk(&Bytes::from(begin)).expect_err("refused");
        assert!(err.to_string().contains("same version"), "{err}");
    }
}
