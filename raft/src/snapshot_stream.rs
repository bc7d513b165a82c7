//! Snapshots of any size: streamed from the sender's engine, staged on the receiver's
//! disk, installed so that a crash at any point leaves the old state or the whole new one.
//!
//! What it owns: openraft's `SnapshotData` ([`SnapshotData`]: a handle, never the
//! snapshot's bytes in one value), the bytes of the snapshot stream and of its chunk
//! messages (`snapshot_stream_request` / `_response`, fields 60/61 of `NodeFrame`), the
//! sender's loop ([`send`]), the receiver's staging in the group's staging engine log
//! ([`Staging`], `ids::staging_log`), the install intent and the roll-forward at open
//! ([`finish_interrupted_install`]). What it must not do: hold a whole snapshot in memory
//! (the sender holds one chunk and one window of entries, the receiver one chunk and at
//! most one partial entry), install anything it has not checked end to end, or decide
//! what a checkpoint holds (`state_machine` decodes it; this module moves its bytes).
//!
//! # The stream
//!
//! A snapshot at log id `S` is one byte stream: the checkpoint (as
//! `state_machine::read_checkpoint` returns it: header and state), then the retained log
//! range, every entry this replica holds from its first (history below openraft's purge
//! mark included) to `S`, each as `len u32 | entry (codec::encode_entry)`, oldest first.
//! The sender reads the range lazily, [`SEND_WINDOW_ENTRIES`] entries at a time, as the
//! chunks go out; nothing bounds the range's size. A `log_store::HistoryPin` keeps the
//! entries not sent yet from being purged by retention meanwhile (it moves up as they go).
//!
//! # Chunk messages (little-endian, fixed width; `OptLogId`/`Membership` as in `codec`)
//!
//! ```text
//! StreamChunk  Vote | transfer u64 | seq u32 | kind u8 | body | crc u32
//!              (crc: CRC-32 of every byte before it)
//!   kind 1 Begin  last_log_id OptLogId | membership_log_id OptLogId | Membership
//!                 | checkpoint_bytes u64 | entries_first u64 | entries_count u64
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
//! total bytes or CRC at `End` differ from what arrived, an entry out of order, a count
//! of entries or a last log id other than `Begin` announced, and a checkpoint whose
//! header does not match the meta. A refused or abandoned transfer is never installed;
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
//! 2. `install_snapshot`: reads the staged checkpoint back (engine-checked), decodes it,
//!    then writes the **intent** (`ids::META_STAGED_INSTALL` on the staging log: where
//!    the stream is, the entries and the last log id, whether the Raft log is
//!    rewritten) and waits until it is durable. From here on the new state is complete
//!    on disk (the staged stream) and the intent says to install it.
//! 3. The checkpoint (`state_machine::write_checkpoint_bytes`: chunks, then pointer).
//! 4. The Raft log rewritten from the staged entries (`log_store::write_staged_range`:
//!    truncate, continue at the range's first index, append, and in the last batch the
//!    purge mark `S`), unless the log already holds `S` from the same leader.
//! 5. One batch deletes the intent and the staged pieces.
//!
//! A crash before 2 is durable leaves the old state (the staging is ignored). A crash
//! after it, at any point of 3–5, is finished at the next open, before the log store
//! and the state machine read anything: [`finish_interrupted_install`] redoes 3 and 4
//! from the staged stream (both are idempotent: they rewrite the same bytes) and then 5.
//! So the replica has either the old checkpoint with its old log, or the new checkpoint
//! with every entry of the range, never a checkpoint without its history. The engine
//! makes a batch durable only after every batch submitted before it, which is what
//! makes "the intent is durable" mean "every staged piece is durable".

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatlog_storage::{Engine, WriteBatch};
use futures_util::StreamExt;

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

const KIND_BEGIN: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_END: u8 = 3;
const INTENT_VERSION: u8 = 1;

/// The chunk size in use: [`STREAM_CHUNK_BYTES`], or [`CHUNK_BYTES_ENV`] if set.
pub fn chunk_bytes() -> usize {
    std::env::var(CHUNK_BYTES_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(STREAM_CHUNK_BYTES, |n| {
            n.clamp(STREAM_CHUNK_BYTES_MIN, STREAM_CHUNK_BYTES)
        })
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
    /// This replica's own snapshot: the checkpoint in memory (the encoding of a state the
    /// node holds anyway), the range read from the log when it is sent.
    Local(LocalSnapshot),
    /// A snapshot received into the staging log, complete and checked.
    Staged(StagedSnapshot),
}

/// A snapshot of this replica.
#[derive(Debug, Clone)]
pub struct LocalSnapshot {
    /// The checkpoint bytes (header and state).
    pub checkpoint: Bytes,
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
    checkpoint_bytes: u64,
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
    /// Bytes of the checkpoint at the stream's start.
    pub checkpoint_bytes: u64,
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
                entries_first: r.u64()?,
                entries_count: r.u64()?,
            })
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
    checkpoint: Bytes,
    at: usize,
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
            if self.at < self.checkpoint.len() {
                let end = (self.at + max - self.pending.len()).min(self.checkpoint.len());
                self.pending
                    .extend_from_slice(&self.checkpoint[self.at..end]);
                self.at = end;
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
        checkpoint_bytes: local.checkpoint.len() as u64,
        entries_first,
        entries_count,
    });
    // `Begin` alone first: the receiver discards an older transfer's pieces on it, and a
    // refusal (an install in progress) is cheapest before any data is read.
    check(call(chunk(0, begin), CHUNK_WAIT).await, 0)?;
    let mut source = StreamSource {
        group,
        checkpoint: local.checkpoint,
        at: 0,
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

/// Follows the entry records of the stream as they arrive (checks order and count).
struct RecordParser {
    checkpoint_left: u64,
    carry: Vec<u8>,
    next_index: u64,
    count_left: u64,
    last: Option<LogId>,
}

impl RecordParser {
    fn feed(&mut self, mut data: &[u8]) -> std::result::Result<(), String> {
        let n = (self.checkpoint_left.min(data.len() as u64)) as usize;
        self.checkpoint_left -= n as u64;
        data = &data[n..];
        if data.is_empty() {
            return Ok(());
        }
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
                parser: RecordParser {
                    checkpoint_left: begin.checkpoint_bytes,
                    carry: Vec::new(),
                    next_index: begin.entries_first,
                    count_left: begin.entries_count,
                    last: None,
                },
                submitted: 0,
                progress: Arc::new(tokio::sync::watch::Sender::new(StageProgress::default())),
            });
            tracing::info!(
                group,
                transfer = format_args!("{:x}", chunk.transfer),
                last = %last,
                checkpoint_bytes = begin.checkpoint_bytes,
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
                let keep = (rx.begin.checkpoint_bytes as usize).min(HEADER_PREFIX_BYTES_MAX);
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
                if rx.parser.checkpoint_left > 0
                    || !rx.parser.carry.is_empty()
                    || rx.parser.count_left > 0
                {
                    return fail(format!(
                        "the stream ends early: {} checkpoint bytes, {} entries missing, {} \
                         bytes of a cut entry",
                        rx.parser.checkpoint_left,
                        rx.parser.count_left,
                        rx.parser.carry.len()
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

/// The intent: `version u8 | transfer u64 | first_piece u64 | next_piece u64
/// | checkpoint_bytes u64 | entries_first u64 | entries_count u64 | last LogId
/// | write_range u8 (0/1)`.
fn encode_intent(layout: &StagedLayout, write_range: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 6 * 8 + codec::LOG_ID_BYTES + 1);
    out.push(INTENT_VERSION);
    for v in [
        layout.transfer,
        layout.first_piece,
        layout.next_piece,
        layout.checkpoint_bytes,
        layout.entries_first,
        layout.entries_count,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    codec::put_log_id(&mut out, &layout.last);
    out.push(u8::from(write_range));
    out
}

fn decode_intent(bytes: &[u8]) -> std::result::Result<(StagedLayout, bool), DecodeError> {
    let mut r = Reader::new("snapshot install intent", bytes);
    let version = r.u8()?;
    if version != INTENT_VERSION {
        return Err(r.error(format!("version {version}")));
    }
    let layout = StagedLayout {
        transfer: r.u64()?,
        first_piece: r.u64()?,
        next_piece: r.u64()?,
        checkpoint_bytes: r.u64()?,
        entries_first: r.u64()?,
        entries_count: r.u64()?,
        last: r.log_id()?,
    };
    let write_range = r.bool()?;
    r.finish()?;
    Ok((layout, write_range))
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

    /// Exactly `n` bytes of the stream.
    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(mut piece) = self.pieces.pop_front() else {
                if self.next_piece >= self.end_piece {
                    return Err(self.missing(format!("{} of {n} bytes", out.len())));
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
                continue;
            };
            let take = (n - out.len()).min(piece.len());
            out.extend_from_slice(&piece[..take]);
            if take < piece.len() {
                self.pieces.push_front(piece.split_off(take));
            }
        }
        Ok(out)
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

impl StagedSnapshot {
    fn reader(&self) -> StagedReader<'_> {
        reader(
            &self.staging.engine,
            self.staging.group,
            self.staging.log,
            &self.layout,
        )
    }

    /// The staged checkpoint bytes (header and state).
    pub fn read_checkpoint(&self) -> Result<Vec<u8>> {
        self.reader()
            .read_exact(self.layout.checkpoint_bytes as usize)
    }

    /// The snapshot's last log id.
    pub fn last(&self) -> LogId {
        self.layout.last
    }

    /// Runs the install (module docs, steps 2–5): `checkpoint` was read with
    /// [`StagedSnapshot::read_checkpoint`] and decoded by the caller; `write_checkpoint`
    /// writes it durably; the range goes into `log` unless it already holds the last
    /// entry. Holds the staging for the whole install.
    pub async fn install<W, WF>(
        &self,
        checkpoint: &[u8],
        log: Option<&LogReader>,
        write_checkpoint: W,
    ) -> Result<()>
    where
        W: FnOnce(Vec<u8>) -> WF,
        WF: Future<Output = Result<()>>,
    {
        let staging = &self.staging;
        let group = staging.group;
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
        let mut intent = WriteBatch::new();
        intent.put_meta(
            staging.log,
            ids::META_STAGED_INSTALL,
            &encode_intent(&self.layout, write_range),
        );
        staging
            .engine
            .write(&intent)
            .await
            .map_err(|e| staging.storage("writing", "the snapshot install intent", e))?;
        test_pause(group, "install intent written").await;
        write_checkpoint(checkpoint.to_vec()).await?;
        test_pause(group, "install checkpoint written").await;
        if write_range && let Some(log) = log {
            let mut reader = self.reader();
            reader.read_exact(self.layout.checkpoint_bytes as usize)?;
            let mut left = self.layout.entries_count;
            log.install_staged(self.layout.entries_first, self.layout.last, || {
                let window = reader.entries(left, INSTALL_WINDOW_BYTES)?;
                left -= window.len() as u64;
                Ok(window)
            })
            .await?;
            test_pause(group, "install range written").await;
        }
        clear(&staging.engine, group, staging.log, self.layout.next_piece).await?;
        drop(st);
        tracing::info!(
            group,
            last = %self.layout.last,
            entries = self.layout.entries_count,
            "snapshot stream: installed"
        );
        Ok(())
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

/// Deletes the intent and every staged piece below `next` in one batch.
async fn clear(
    engine: &Engine,
    group: GroupId,
    log: chatlog_storage::LogId,
    next: u64,
) -> Result<()> {
    let mut batch = WriteBatch::new();
    batch.delete_meta(log, ids::META_STAGED_INSTALL);
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
/// install a crash interrupted (an intent is present: redo the checkpoint and the range
/// from the staged stream, then clear), or deletes the pieces of a transfer that never
/// completed. Returns whether an install was finished.
pub async fn finish_interrupted_install(engine: &Engine, group: GroupId) -> Result<bool> {
    let Some(log) = ids::staging_log(group) else {
        return Ok(false);
    };
    let Some(bytes) = engine.meta(log, ids::META_STAGED_INSTALL) else {
        if engine.bounds(log).is_some_and(|b| b.next > b.first) {
            let next = engine.bounds(log).map_or(1, |b| b.next);
            tracing::info!(
                group,
                "snapshot stream: deleting the pieces of an unfinished transfer"
            );
            clear(engine, group, log, next).await?;
        }
        return Ok(false);
    };
    let (layout, write_range) = decode_intent(&bytes).map_err(|source| Error::Decode {
        group,
        subject: "the snapshot install intent".into(),
        source,
    })?;
    tracing::warn!(
        group,
        last = %layout.last,
        entries = layout.entries_count,
        write_range,
        "snapshot stream: finishing an install interrupted by a crash"
    );
    let mut r = reader(engine, group, log, &layout);
    let checkpoint = r.read_exact(layout.checkpoint_bytes as usize)?;
    crate::state_machine::write_checkpoint_bytes(engine, group, &checkpoint).await?;
    drop(checkpoint);
    if write_range {
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

    use crate::log_store::LogStore;
    use crate::types::{ChatBatch, EntryPayload};
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};

    const GROUP: GroupId = 3;
    const LAST: u64 = 300;

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

    fn entries(n: u64) -> Vec<Entry> {
        (1..=n)
            .map(|i| Entry {
                log_id: log_id(2, 1, i),
                payload: EntryPayload::Normal(ChatBatch(Bytes::from(format!(
                    "entry {i} {}",
                    "y".repeat(100)
                )))),
            })
            .collect()
    }

    /// Checkpoint bytes with a real header for `meta` (only the header is checked before
    /// an install; the state is opaque here).
    fn checkpoint(meta: &SnapshotMeta, state_bytes: usize) -> Bytes {
        let mut out = vec![crate::state_machine::SNAPSHOT_VERSION];
        put_opt_log_id(&mut out, meta.last_log_id.as_ref());
        put_opt_log_id(&mut out, meta.last_membership.log_id().as_ref());
        codec::put_membership(&mut out, meta.last_membership.membership());
        out.extend_from_slice(&(state_bytes as u64).to_le_bytes());
        out.extend((0..state_bytes).map(|i| i as u8));
        Bytes::from(out)
    }

    /// The stream of `checkpoint` and `entries` (module docs).
    fn stream(checkpoint: &[u8], entries: &[Entry]) -> Vec<u8> {
        let mut out = checkpoint.to_vec();
        for e in entries {
            let b = codec::encode_entry(e);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&b);
        }
        out
    }

    /// A sender's log holding `entries(LAST)`.
    async fn sender_log(dir: &std::path::Path) -> (Arc<Engine>, LogStore, LogReader) {
        let engine = engine(dir);
        let mut store = LogStore::open(Arc::clone(&engine), GROUP).expect("log store");
        store.blocking_append(entries(LAST)).await.expect("appends");
        let reader = store.get_log_reader().await;
        (engine, store, reader)
    }

    /// Streams a snapshot at `LAST` from `reader` into `staging` through [`send`] with
    /// `chunk` bytes per chunk; returns the staged snapshot, the checkpoint and the
    /// number of chunks sent.
    async fn transfer(
        reader: &LogReader,
        staging: &Arc<Staging>,
        chunk: usize,
    ) -> (StagedSnapshot, Bytes, u64) {
        let meta = meta(LAST);
        let checkpoint = checkpoint(&meta, 5000);
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
            meta: meta.clone(),
            snapshot: SnapshotData::Local(LocalSnapshot {
                checkpoint: checkpoint.clone(),
                log: Some(reader.clone()),
                upto: LAST,
            }),
        };
        let vote = send(GROUP, Vote::new(1, 1), snapshot, chunk, call)
            .await
            .expect("the transfer succeeds");
        assert_eq!(vote, Vote::new(1, 1));
        let snapshot = staged.lock().unwrap().take().expect("complete");
        assert_eq!(snapshot.meta, meta);
        let SnapshotData::Staged(staged) = snapshot.snapshot else {
            panic!("a staged snapshot")
        };
        (staged, checkpoint, sent.load(Ordering::Relaxed))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_streams_in_chunks_and_installs_with_its_whole_range() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_engine_a, _store_a, reader_a) = sender_log(a.path()).await;
        let engine_b = engine(b.path());
        let mut store_b = LogStore::open(Arc::clone(&engine_b), GROUP).expect("log store");
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
        let reader_b = store_b.get_log_reader().await;
        let staging = Staging::new(Arc::clone(&engine_b), GROUP).unwrap();
        // A transfer whose sender vanished half way: staged bytes, never completed. The
        // next Begin discards them.
        let abandoned = StreamChunk {
            vote: Vote::new(1, 3),
            transfer: 99,
            seq: 0,
            body: ChunkBody::Begin(Begin {
                meta: meta(LAST),
                checkpoint_bytes: 10,
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
        let (staged, checkpoint, chunks) = transfer(&reader_a, &staging, 512).await;
        let stream_bytes = stream(&checkpoint, &entries(LAST)).len() as u64;
        assert_eq!(chunks, 2 + stream_bytes.div_ceil(512), "Begin, Data…, End");
        assert!(chunks > 50, "{chunks} chunks");
        assert_eq!(staged.read_checkpoint().unwrap(), checkpoint.to_vec());
        let engine = Arc::clone(&engine_b);
        staged
            .install(&checkpoint, Some(&reader_b), async move |bytes: Vec<u8>| {
                crate::state_machine::write_checkpoint_bytes(&engine, GROUP, &bytes).await
            })
            .await
            .expect("installs");
        staging.done_installing(staged.layout.transfer).await;
        assert_eq!(
            crate::state_machine::read_checkpoint(&engine_b, GROUP).unwrap(),
            Some(checkpoint.to_vec())
        );
        assert_eq!(reader_b.read_history(0, LAST + 1).unwrap(), entries(LAST));
        let log = ids::staging_log(GROUP).unwrap();
        assert!(engine_b.meta(log, ids::META_STAGED_INSTALL).is_none());
        assert!(engine_b.bounds(log).is_none_or(|b| b.next == b.first));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_install_interrupted_after_its_intent_is_finished_at_open() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_engine_a, _store_a, reader_a) = sender_log(a.path()).await;
        let old = meta(10);
        {
            let engine_b = engine(b.path());
            // The receiver's old state: a checkpoint and a log of its own.
            crate::state_machine::write_checkpoint_bytes(&engine_b, GROUP, &checkpoint(&old, 10))
                .await
                .unwrap();
            let staging = Staging::new(Arc::clone(&engine_b), GROUP).unwrap();
            let (staged, checkpoint, _) = transfer(&reader_a, &staging, 4096).await;
            // The install's first steps, then a crash: the intent, the checkpoint and half
            // of the range are durable.
            let mut intent = WriteBatch::new();
            intent.put_meta(
                staging.log,
                ids::META_STAGED_INSTALL,
                &encode_intent(&staged.layout, true),
            );
            engine_b.write(&intent).await.unwrap();
            crate::state_machine::write_checkpoint_bytes(&engine_b, GROUP, &checkpoint)
                .await
                .unwrap();
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
        let (applied, _) = crate::state_machine::checkpoint_header(
            &crate::state_machine::read_checkpoint(&engine_b, GROUP)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(applied, Some(log_id(2, 1, LAST)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transfer_interrupted_before_its_intent_leaves_the_old_state() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_engine_a, _store_a, reader_a) = sender_log(a.path()).await;
        let old = checkpoint(&meta(10), 10);
        {
            let engine_b = engine(b.path());
            crate::state_machine::write_checkpoint_bytes(&engine_b, GROUP, &old)
                .await
                .unwrap();
            let staging = Staging::new(Arc::clone(&engine_b), GROUP).unwrap();
            // Staged completely, never installed (a crash before the intent).
            let (staged, _, _) = transfer(&reader_a, &staging, 4096).await;
            drop((staging, staged));
            close(engine_b);
        }
        let engine_b = engine(b.path());
        assert!(!finish_interrupted_install(&engine_b, GROUP).await.unwrap());
        assert_eq!(
            crate::state_machine::read_checkpoint(&engine_b, GROUP).unwrap(),
            Some(old.to_vec())
        );
        let log = ids::staging_log(GROUP).unwrap();
        assert!(
            engine_b.bounds(log).is_none_or(|b| b.next == b.first),
            "pieces deleted"
        );
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
        let cp = checkpoint(&meta, 100);
        let good: Vec<Entry> = (11..=20)
            .map(|i| Entry {
                log_id: log_id(2, 1, i),
                payload: EntryPayload::Blank,
            })
            .collect();
        let begin = |transfer: u64, count: u64| StreamChunk {
            vote,
            transfer,
            seq: 0,
            body: ChunkBody::Begin(Begin {
                meta: meta.clone(),
                checkpoint_bytes: cp.len() as u64,
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
        let all = stream(&cp, &good);
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
        let short = stream(&cp, &good[..9]);
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
        refused(data(11, 1, 0, &stream(&cp, &swapped)), "was expected").await;
        // A checkpoint whose header is not the meta's.
        let wrong = stream(&checkpoint(&self::meta(19), 100), &good);
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
            entries_first: 5,
            entries_count: 6,
            last: log_id(7, 8, 10),
        };
        for w in [false, true] {
            assert_eq!(decode_intent(&encode_intent(&layout, w)), Ok((layout, w)));
        }
        assert!(decode_intent(&[2]).is_err());
    }
}
