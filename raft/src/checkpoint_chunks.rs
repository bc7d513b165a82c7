//! Incremental checkpoints on disk: the index chunks of `chat::index_chunks` written
//! once into the group's index chunk log, and checkpoints that reference them.
//!
//! What it owns: the index chunk log (`ids::index_chunk_log`, engine log `g << 2 | 3`),
//! the chunk directory (which engine entries hold which chunk), the second form of the
//! checkpoint pointer, and reading an incremental checkpoint back (chunks checked against
//! the directory's CRC and size, then decoded). What it must not do: decide what a chunk
//! or the rest of the state holds (`chat::index_chunks` does, deterministically) or
//! write without the group's checkpoint lock (`crate::checkpointer`): the caller plans
//! and writes under it, so the chunk log has one writer and its bounds are final when a
//! plan is made.
//!
//! # Why
//!
//! A whole-state checkpoint encodes and writes 16 bytes per indexed event every
//! `SmConfig::checkpoint_every_entries` entries: its cost grows with retained history.
//! An incremental one encodes and writes the chunks completed since the last checkpoint
//! (16 bytes per new event) and the state outside the chunks (users, chats, the dedupe
//! window, at most two chunks' worth of locations), plus 36 bytes of directory per
//! referenced chunk (one per 16,384 entries of retained history).
//!
//! # Bytes
//!
//! ```text
//! pointer v2 (meta `checkpoint` of the checkpoint log; v1 is 24 bytes, no version)
//!     version u8 (2) | first u64 | count u64 | checkpoint_bytes u64 | directory_bytes u64
//!     `count` entries of the checkpoint log from `first` hold the checkpoint (header
//!     and `index_chunks::encode_outside`, as `state_machine`'s header wraps a state)
//!     then the directory, cut into pieces
//! directory
//!     count u64 | count × (k u64 | first_piece u64 | pieces u64 | bytes u64 | crc u32)
//!     one record per chunk of the region, in order; chunk k is `pieces` entries of the
//!     index chunk log from `first_piece`, `bytes` long, CRC-32 `crc`
//! ```
//!
//! The checkpoint bytes and the chunks are the same on every replica at the same applied
//! index; the directory (where this replica's engine put them) is local, which is why it
//! is kept apart from them.
//!
//! # Order of writes
//!
//! New chunks first, then the checkpoint and directory pieces, then one batch: the
//! pointer, the purge of older checkpoint pieces, and the purge of chunks no longer
//! referenced (a prefix of the chunk log: chunks are written in region order and the
//! region only moves up). The engine makes a batch durable only after the ones before
//! it, so the pointer never names a missing piece or chunk. The purges spare the pieces
//! of checkpoints being sent as snapshots ([`Keeper`] pins, s9snap); the next checkpoint
//! purges them.
//!
//! # As a snapshot (s9snap)
//!
//! A snapshot is this replica's durable incremental checkpoint ([`CheckpointHandle`]:
//! meta and pointer, no bytes) plus the retained log range (`snapshot_stream`). Its
//! checkpoint section in the stream is read piece by piece from the engine
//! ([`SectionReader`]), never assembled:
//!
//! ```text
//! section   checkpoint (rest_bytes: header + index_chunks::encode_outside)
//!           | chunks × (k u64 | bytes u64 | crc u32 | bytes of chunk k)
//! ```
//!
//! with the chunks of the region in order (k consecutive). The directory is not sent:
//! it says where the sender's engine put the chunks. The receiver writes the section as
//! its own pieces ([`write_section`]: chunks into its chunk log, checked against their
//! CRC as they are copied, then the checkpoint and a directory of its own), loads the
//! state from them as a restart does, and only then publishes the pointer ([`publish`],
//! after `snapshot_stream`'s durable install intent); an abandoned write is dropped
//! ([`discard_from`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chatlog_storage::{Engine, WriteBatch};

use crate::chat::GroupState;
use crate::chat::index_chunks::{self, ChunkRegion, ChunkRuns};
use crate::codec::{DecodeError, Reader};
use crate::error::Error;
use crate::ids;
use crate::types::GroupId;

/// Version byte of the second pointer form.
const POINTER_V2: u8 = 2;
/// Bytes of a v1 pointer (`first u64 | count u64 | bytes u64`).
pub const POINTER_V1_BYTES: usize = 24;
/// Bytes of one directory record.
const DIRECTORY_RECORD_BYTES: usize = 36;
/// Bytes per entry of the checkpoint and chunk logs at most: 1 MiB
/// (`state_machine::CHECKPOINT_CHUNK_BYTES`), a quarter of the engine's batch limit if
/// smaller, so several go into one batch.
fn piece_bytes(engine: &Engine) -> usize {
    crate::state_machine::CHECKPOINT_CHUNK_BYTES
        .min(engine.write_batch_bytes_max() / 4)
        .max(1)
}

/// Where one chunk lives in this replica's index chunk log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk (`index_chunks`: Raft indexes `[k × CHUNK_ENTRIES, …)`).
    pub k: u64,
    /// Its first entry in the chunk log.
    pub first_piece: u64,
    /// Entries it spans.
    pub pieces: u64,
    /// Its length.
    pub bytes: u64,
    /// CRC-32 of its bytes.
    pub crc: u32,
}

/// The chunks of this replica's chunk log that are durable (or being written by the
/// checkpoint in flight), by chunk number.
pub type ChunkDirectory = BTreeMap<u64, ChunkRef>;

/// A checkpoint's pointer, either form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointer {
    /// A whole-state checkpoint: `count` entries from `first`, `bytes` long.
    Whole {
        /// First entry.
        first: u64,
        /// Entries.
        count: u64,
        /// Bytes.
        bytes: u64,
    },
    /// An incremental one: `count` entries from `first` hold `checkpoint` bytes, then
    /// `directory` bytes.
    Incremental {
        /// First entry.
        first: u64,
        /// Entries.
        count: u64,
        /// Bytes of the checkpoint.
        checkpoint: u64,
        /// Bytes of the directory after it.
        directory: u64,
    },
}

impl Pointer {
    /// The pointer's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(33);
        match *self {
            Pointer::Whole {
                first,
                count,
                bytes,
            } => {
                for x in [first, count, bytes] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
            }
            Pointer::Incremental {
                first,
                count,
                checkpoint,
                directory,
            } => {
                v.push(POINTER_V2);
                for x in [first, count, checkpoint, directory] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        v
    }

    /// Decodes either form (told apart by length).
    pub fn decode(b: &[u8]) -> Result<Pointer, DecodeError> {
        let mut r = Reader::new("checkpoint pointer", b);
        let p = if b.len() == POINTER_V1_BYTES {
            Pointer::Whole {
                first: r.u64()?,
                count: r.u64()?,
                bytes: r.u64()?,
            }
        } else {
            let version = r.u8()?;
            if version != POINTER_V2 {
                return Err(r.error(format!("version {version}")));
            }
            Pointer::Incremental {
                first: r.u64()?,
                count: r.u64()?,
                checkpoint: r.u64()?,
                directory: r.u64()?,
            }
        };
        r.finish()?;
        Ok(p)
    }

    /// `(first, count, total bytes)` of the pieces in the checkpoint log.
    pub fn pieces(&self) -> (u64, u64, u64) {
        match *self {
            Pointer::Whole {
                first,
                count,
                bytes,
            } => (first, count, bytes),
            Pointer::Incremental {
                first,
                count,
                checkpoint,
                directory,
            } => (first, count, checkpoint + directory),
        }
    }
}

fn encode_directory(refs: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + refs.len() * DIRECTORY_RECORD_BYTES);
    out.extend_from_slice(&(refs.len() as u64).to_le_bytes());
    for c in refs {
        for x in [c.k, c.first_piece, c.pieces, c.bytes] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&c.crc.to_le_bytes());
    }
    out
}

fn decode_directory(bytes: &[u8]) -> Result<Vec<ChunkRef>, DecodeError> {
    let mut r = Reader::new("checkpoint chunk directory", bytes);
    let n = r.u64_count(DIRECTORY_RECORD_BYTES, usize::MAX)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(ChunkRef {
            k: r.u64()?,
            first_piece: r.u64()?,
            pieces: r.u64()?,
            bytes: r.u64()?,
            crc: r.u32()?,
        });
    }
    r.finish()?;
    Ok(out)
}

/// One incremental checkpoint, encoded and ready to write.
#[derive(Debug)]
pub struct Plan {
    /// The checkpoint bytes (header and the state outside the chunks).
    checkpoint: Vec<u8>,
    /// Chunks this replica has not written yet, in order, with where they will go.
    new_chunks: Vec<(ChunkRef, Vec<u8>)>,
    /// Every chunk of the region, in order.
    directory: Vec<ChunkRef>,
    /// The chunk log's first entry still referenced (everything below goes).
    keep_chunks_from: u64,
}

impl Plan {
    /// Bytes this checkpoint writes: the new chunks, the checkpoint and the directory.
    pub fn bytes_written(&self) -> u64 {
        let chunks: usize = self.new_chunks.iter().map(|(_, b)| b.len()).sum();
        (chunks + self.checkpoint.len() + self.directory.len() * DIRECTORY_RECORD_BYTES + 8) as u64
    }

    /// The checkpoint bytes (what `read_checkpoint_parts` returns first).
    pub fn checkpoint(&self) -> &[u8] {
        &self.checkpoint
    }
}

/// Plans the incremental checkpoint of `state` applied through `applied`, wrapping the
/// state bytes with `wrap` (the state machine's header). Encodes only chunks missing from
/// `written` (which it updates: new chunks added, those left behind by the region
/// dropped). Must run with the checkpoint lock held and no checkpoint write in flight.
pub fn plan(
    engine: &Engine,
    group: GroupId,
    state: &GroupState,
    applied: u64,
    written: &mut ChunkDirectory,
    wrap: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<Plan, Error> {
    let log = ids::index_chunk_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let (region, rest) = index_chunks::encode_outside(state, applied);
    let checkpoint = wrap(&rest);
    drop(rest);
    written.retain(|k, _| region.chunks().contains(k));
    let piece = piece_bytes(engine) as u64;
    let mut next_piece = engine.bounds(log).map_or(1, |b| b.next.max(1));
    let mut new_chunks = Vec::new();
    for k in region.chunks() {
        if written.contains_key(&k) {
            continue;
        }
        let bytes = index_chunks::encode_chunk(state, k);
        let chunk = ChunkRef {
            k,
            first_piece: next_piece,
            pieces: (bytes.len() as u64).div_ceil(piece).max(1),
            bytes: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
        };
        next_piece += chunk.pieces;
        written.insert(k, chunk);
        new_chunks.push((chunk, bytes));
    }
    let directory: Vec<ChunkRef> = region.chunks().map(|k| written[&k]).collect();
    let keep_chunks_from = directory.first().map_or(next_piece, |c| c.first_piece);
    Ok(Plan {
        checkpoint,
        new_chunks,
        directory,
        keep_chunks_from,
    })
}

/// Writes `plan` (module docs, "Order of writes") and waits until the pointer is durable;
/// returns the pointer. Its purges spare the pieces `keeper` has pinned (snapshots being
/// sent).
pub async fn write(
    engine: &Engine,
    group: GroupId,
    plan: Plan,
    keeper: &Keeper,
) -> Result<Pointer, Error> {
    let (Some(chunk_log), Some(cp_log)) = (ids::index_chunk_log(group), ids::checkpoint_log(group))
    else {
        return Err(Error::GroupIdTooLarge {
            group,
            max: ids::GROUP_ID_MAX,
        });
    };
    let storage_err = |source| Error::Storage {
        group,
        verb: "writing",
        subject: "an incremental checkpoint".into(),
        source,
    };
    let piece = piece_bytes(engine);
    let per_batch = (engine.write_batch_bytes_max() / 2 / piece).max(1);
    // The new chunks, each `pieces` entries from its `first_piece`.
    let mut pieces: Vec<(u64, &[u8])> = Vec::new();
    for (c, bytes) in &plan.new_chunks {
        let parts: Vec<&[u8]> = if bytes.is_empty() {
            vec![&bytes[..]]
        } else {
            bytes.chunks(piece).collect()
        };
        debug_assert_eq!(parts.len() as u64, c.pieces);
        for (i, p) in parts.into_iter().enumerate() {
            pieces.push((c.first_piece + i as u64, p));
        }
    }
    for group_of_pieces in pieces.chunks(per_batch) {
        let mut batch = WriteBatch::new();
        batch.append_many(
            chunk_log,
            group_of_pieces[0].0,
            group_of_pieces.iter().map(|(_, p)| *p),
        );
        engine.write(&batch).await.map_err(storage_err)?;
    }
    // The checkpoint and the directory.
    let mut body = plan.checkpoint;
    let checkpoint_bytes = body.len() as u64;
    body.extend_from_slice(&encode_directory(&plan.directory));
    let first = engine.bounds(cp_log).map_or(1, |b| b.next.max(1));
    let parts: Vec<&[u8]> = body.chunks(piece).collect();
    let mut index = first;
    for group_of_parts in parts.chunks(per_batch) {
        let mut batch = WriteBatch::new();
        batch.append_many(cp_log, index, group_of_parts.iter().copied());
        engine.write(&batch).await.map_err(storage_err)?;
        index += group_of_parts.len() as u64;
    }
    let pointer = Pointer::Incremental {
        first,
        count: parts.len() as u64,
        checkpoint: checkpoint_bytes,
        directory: body.len() as u64 - checkpoint_bytes,
    };
    publish(engine, group, Some(keeper), pointer, plan.keep_chunks_from).await?;
    Ok(pointer)
}

/// Makes `pointer` the group's checkpoint in one batch, with the purge of the checkpoint
/// pieces below it and of the index chunks below `keep_chunks_from`, except what
/// `keeper` has pinned; waits until it is durable.
pub async fn publish(
    engine: &Engine,
    group: GroupId,
    keeper: Option<&Keeper>,
    pointer: Pointer,
    keep_chunks_from: u64,
) -> Result<(), Error> {
    let (chunk_log, cp_log) = logs(group)?;
    let (first, _, _) = pointer.pieces();
    let want = PiecesFrom {
        checkpoint: first,
        chunks: keep_chunks_from,
    };
    let at = keeper.map_or(want, |k| k.purge_points(want));
    let mut batch = WriteBatch::new();
    batch.put_meta(cp_log, ids::META_CHECKPOINT, &pointer.encode());
    batch.purge_before(cp_log, at.checkpoint);
    batch.purge_before(chunk_log, at.chunks);
    engine.write(&batch).await.map_err(|source| Error::Storage {
        group,
        verb: "writing",
        subject: "the checkpoint pointer".into(),
        source,
    })
}

/// The group's index chunk log and checkpoint log.
fn logs(group: GroupId) -> Result<(chatlog_storage::LogId, chatlog_storage::LogId), Error> {
    match (ids::index_chunk_log(group), ids::checkpoint_log(group)) {
        (Some(chunks), Some(checkpoints)) => Ok((chunks, checkpoints)),
        _ => Err(Error::GroupIdTooLarge {
            group,
            max: ids::GROUP_ID_MAX,
        }),
    }
}

/// An incremental checkpoint read back: its chunks, decoded in region order, and the
/// directory (what this replica has written).
#[derive(Debug)]
pub struct Loaded {
    /// The region's chunks, decoded and checked, in order.
    pub chunks: Vec<ChunkRuns>,
    /// Where they are.
    pub directory: ChunkDirectory,
}

/// Reads the chunks `directory_bytes` names for the region of `state_bytes` (the
/// checkpoint's state part, `index_chunks::encode_outside`), each checked by the
/// engine's read, its length and CRC and its decode.
pub fn load_chunks(
    engine: &Engine,
    group: GroupId,
    state_bytes: &[u8],
    directory_bytes: &[u8],
) -> Result<Loaded, Error> {
    let decode_err = |subject: &str, source| Error::Decode {
        group,
        subject: subject.into(),
        source,
    };
    let log = ids::index_chunk_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let region: ChunkRegion = index_chunks::region_of(state_bytes)
        .map_err(|e| decode_err("the incremental checkpoint", e))?;
    let refs = decode_directory(directory_bytes)
        .map_err(|e| decode_err("the checkpoint's chunk directory", e))?;
    if refs.iter().map(|c| c.k).ne(region.chunks()) {
        return Err(Error::Inconsistent {
            group,
            detail: format!(
                "the chunk directory names chunks {:?}, the checkpoint chunks [{}, {})",
                refs.iter().map(|c| c.k).collect::<Vec<_>>(),
                region.first,
                region.end
            ),
        });
    }
    let mut chunks = Vec::with_capacity(refs.len());
    let mut directory = ChunkDirectory::new();
    for c in refs {
        let parts = engine
            .read(log, c.first_piece..c.first_piece + c.pieces, usize::MAX)
            .map_err(|source| Error::Storage {
                group,
                verb: "reading",
                subject: format!("index chunk {} from entry {}", c.k, c.first_piece),
                source,
            })?;
        let mut bytes = Vec::with_capacity(c.bytes as usize);
        for p in &parts {
            bytes.extend_from_slice(p);
        }
        if parts.len() as u64 != c.pieces
            || bytes.len() as u64 != c.bytes
            || crc32fast::hash(&bytes) != c.crc
        {
            return Err(Error::Inconsistent {
                group,
                detail: format!(
                    "index chunk {}: {} entries of {} bytes (crc {:08x}), the directory says \
                     {} of {} (crc {:08x})",
                    c.k,
                    parts.len(),
                    bytes.len(),
                    crc32fast::hash(&bytes),
                    c.pieces,
                    c.bytes,
                    c.crc
                ),
            });
        }
        chunks.push(
            index_chunks::decode_chunk(c.k, &bytes)
                .map_err(|e| decode_err(&format!("index chunk {}", c.k), e))?,
        );
        directory.insert(c.k, c);
    }
    Ok(Loaded { chunks, directory })
}

// ---------------------------------------------------------------------------------------
// Snapshots: a stored checkpoint sent piece by piece, and received pieces written
// ---------------------------------------------------------------------------------------

/// First entries of the checkpoint log and of the index chunk log a checkpoint uses (or a
/// purge keeps). `chunks` is `u64::MAX` for a checkpoint without chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PiecesFrom {
    /// First entry of the checkpoint log.
    pub checkpoint: u64,
    /// First entry of the index chunk log.
    pub chunks: u64,
}

/// Snapshots of one group being sent at once, at most: 16. Why: openraft runs one
/// snapshot transmission per follower of a group, so a group has at most as many as
/// followers; each pins its checkpoint's pieces against purges until it is sent.
pub const SNAPSHOTS_SENT_MAX: usize = 16;

/// What a replica keeps of its durable incremental checkpoints for snapshots (one per
/// replica, shared by the state machine's checkpoint writes and the snapshots it hands
/// out): which checkpoint is the current one (its meta and pointer: the snapshot openraft
/// is given), and pins on the pieces of those being sent, which checkpoint writes do not
/// purge meanwhile (the purge they skip is done by the next checkpoint write).
#[derive(Debug, Default)]
pub struct Keeper {
    state: std::sync::Mutex<KeeperState>,
}

#[derive(Debug, Default)]
struct KeeperState {
    current: Option<(crate::types::SnapshotMeta, Pointer)>,
    pins: BTreeMap<u64, PiecesFrom>,
    next_pin: u64,
    /// The purge points of the last publish planned (its batch may still be on its way):
    /// a pin below them would come too late.
    purging: Option<PiecesFrom>,
}

impl Keeper {
    fn state(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        // Nothing panics under this lock; a poisoned one still holds consistent fields.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The durable incremental checkpoint, if the replica has one (`None` before the
    /// first, or while the durable one is a whole checkpoint of older code or a restore).
    pub fn current(&self) -> Option<(crate::types::SnapshotMeta, Pointer)> {
        self.state().current.clone()
    }

    /// Records `pointer`, at `meta`, as the durable checkpoint (once its pointer is).
    pub fn set_current(&self, meta: crate::types::SnapshotMeta, pointer: Pointer) {
        self.state().current = Some((meta, pointer));
    }

    /// Pins the pieces from `from` until the pin is dropped; refused when a purge of
    /// them is already planned, or [`SNAPSHOTS_SENT_MAX`] pins are held.
    pub fn pin(self: &Arc<Self>, from: PiecesFrom) -> Result<Pin, String> {
        let mut st = self.state();
        if let Some(p) = st.purging
            && (from.checkpoint < p.checkpoint || from.chunks < p.chunks)
        {
            return Err(format!(
                "the checkpoint's pieces (from {}/{}) are being purged by a newer checkpoint \
                 (below {}/{})",
                from.checkpoint, from.chunks, p.checkpoint, p.chunks
            ));
        }
        if st.pins.len() >= SNAPSHOTS_SENT_MAX {
            return Err(format!(
                "{SNAPSHOTS_SENT_MAX} snapshots of the group are being sent already"
            ));
        }
        st.next_pin += 1;
        let id = st.next_pin;
        st.pins.insert(id, from);
        Ok(Pin {
            keeper: Arc::clone(self),
            id,
        })
    }

    /// Where a publish that wants to purge below `want` may purge: no higher than any
    /// pin. Recorded, so a pin taken from now on is refused below it.
    fn purge_points(&self, want: PiecesFrom) -> PiecesFrom {
        let mut st = self.state();
        let at = st.pins.values().fold(want, |at, p| PiecesFrom {
            checkpoint: at.checkpoint.min(p.checkpoint),
            chunks: at.chunks.min(p.chunks),
        });
        st.purging = Some(st.purging.map_or(at, |p| PiecesFrom {
            checkpoint: p.checkpoint.max(at.checkpoint),
            chunks: p.chunks.max(at.chunks),
        }));
        at
    }
}

/// Keeps a checkpoint's pieces from being purged while it is sent ([`Keeper::pin`]).
#[derive(Debug)]
pub struct Pin {
    keeper: Arc<Keeper>,
    id: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.keeper.state().pins.remove(&self.id);
    }
}

/// One of this replica's durable incremental checkpoints, by its pointer: what a
/// snapshot sends (`snapshot_stream`). Holds no bytes.
#[derive(Clone)]
pub struct CheckpointHandle {
    engine: Arc<Engine>,
    group: GroupId,
    pointer: Pointer,
    keeper: Arc<Keeper>,
}

impl std::fmt::Debug for CheckpointHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointHandle")
            .field("group", &self.group)
            .field("pointer", &self.pointer)
            .finish_non_exhaustive()
    }
}

impl CheckpointHandle {
    /// The checkpoint `pointer` names in `engine` (`keeper` pins it while it is read).
    pub fn new(
        engine: Arc<Engine>,
        group: GroupId,
        pointer: Pointer,
        keeper: Arc<Keeper>,
    ) -> CheckpointHandle {
        CheckpointHandle {
            engine,
            group,
            pointer,
            keeper,
        }
    }

    /// The group's durable checkpoint, if it is an incremental one.
    pub fn durable(
        engine: Arc<Engine>,
        group: GroupId,
        keeper: Arc<Keeper>,
    ) -> Result<Option<CheckpointHandle>, Error> {
        let (_, cp_log) = logs(group)?;
        let Some(bytes) = engine.meta(cp_log, ids::META_CHECKPOINT) else {
            return Ok(None);
        };
        let pointer = Pointer::decode(&bytes).map_err(|source| Error::Decode {
            group,
            subject: "the checkpoint pointer".into(),
            source,
        })?;
        Ok(matches!(pointer, Pointer::Incremental { .. })
            .then(|| CheckpointHandle::new(engine, group, pointer, keeper)))
    }

    /// The pointer.
    pub fn pointer(&self) -> Pointer {
        self.pointer
    }

    /// Whether it is a checkpoint of group `group` in `engine` (not another replica's).
    pub fn is_in(&self, engine: &Arc<Engine>, group: GroupId) -> bool {
        Arc::ptr_eq(&self.engine, engine) && self.group == group
    }

    /// Starts reading it as a snapshot stream's checkpoint section ([`SectionReader`]),
    /// its pieces pinned until the reader is dropped.
    pub fn open(&self) -> Result<SectionReader, Error> {
        let (chunk_log, cp_log) = logs(self.group)?;
        let group = self.group;
        let Pointer::Incremental {
            first,
            count,
            checkpoint,
            directory,
        } = self.pointer
        else {
            return Err(Error::Inconsistent {
                group,
                detail: "a whole checkpoint is not sent as a snapshot".into(),
            });
        };
        let purged = |log: chatlog_storage::LogId, at: u64| {
            (at != u64::MAX && self.engine.bounds(log).is_none_or(|b| b.first > at)).then(|| {
                Error::Inconsistent {
                    group,
                    detail: format!(
                        "the checkpoint's pieces from {at} of log {log} were purged by a newer \
                         checkpoint; a new snapshot will be sent"
                    ),
                }
            })
        };
        if let Some(e) = purged(cp_log, first) {
            return Err(e);
        }
        let refs = read_directory(&self.engine, group, cp_log, first, count, directory)
            .map_err(|e| purged(cp_log, first).unwrap_or(e))?;
        let from = PiecesFrom {
            checkpoint: first,
            chunks: refs.first().map_or(u64::MAX, |c| c.first_piece),
        };
        let pin = self
            .keeper
            .pin(from)
            .map_err(|detail| Error::Inconsistent {
                group,
                detail: format!("{detail}; a new snapshot will be sent"),
            })?;
        // Pinned only now: the pieces may have gone just before (a purge racing the pin
        // is refused by it; one already done is found here).
        if let Some(e) = purged(cp_log, first).or_else(|| purged(chunk_log, from.chunks)) {
            return Err(e);
        }
        Ok(SectionReader {
            engine: Arc::clone(&self.engine),
            group,
            cp_log,
            chunk_log,
            _pin: pin,
            rest_bytes: checkpoint,
            cp_next: first,
            cp_end: first + count,
            rest_left: checkpoint,
            directory: refs,
            chunk_at: 0,
            chunk_started: false,
            chunk_next: 0,
            chunk_seen: 0,
            chunk_crc: crc32fast::Hasher::new(),
        })
    }
}

/// Bytes of a chunk record's head in a snapshot stream: `k u64 | bytes u64 | crc u32`.
pub const CHUNK_HEAD_BYTES: usize = 20;

/// Encodes a chunk record's head (module docs, "As a snapshot").
pub fn encode_chunk_head(k: u64, bytes: u64, crc: u32) -> [u8; CHUNK_HEAD_BYTES] {
    let mut out = [0u8; CHUNK_HEAD_BYTES];
    out[..8].copy_from_slice(&k.to_le_bytes());
    out[8..16].copy_from_slice(&bytes.to_le_bytes());
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a chunk record's head: `(k, bytes, crc)`.
pub fn decode_chunk_head(head: &[u8; CHUNK_HEAD_BYTES]) -> (u64, u64, u32) {
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(head[16..].try_into().expect("4 bytes"));
    (u64_at(0), u64_at(8), crc)
}

/// Reads a stored incremental checkpoint as a snapshot stream's checkpoint section
/// (module docs, "As a snapshot"), one engine entry at a time: the checkpoint bytes,
/// then each chunk's head and pieces, every piece checked by the engine's read and every
/// chunk against its directory record (length and CRC-32) once its last piece is read.
/// Holds a [`Pin`] on the pieces.
pub struct SectionReader {
    engine: Arc<Engine>,
    group: GroupId,
    cp_log: chatlog_storage::LogId,
    chunk_log: chatlog_storage::LogId,
    _pin: Pin,
    rest_bytes: u64,
    cp_next: u64,
    cp_end: u64,
    rest_left: u64,
    directory: Vec<ChunkRef>,
    chunk_at: usize,
    chunk_started: bool,
    chunk_next: u64,
    chunk_seen: u64,
    chunk_crc: crc32fast::Hasher,
}

impl std::fmt::Debug for SectionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectionReader")
            .field("group", &self.group)
            .field("rest_left", &self.rest_left)
            .field("chunk_at", &self.chunk_at)
            .finish_non_exhaustive()
    }
}

impl SectionReader {
    /// Bytes of the checkpoint (header and the state outside the chunks).
    pub fn rest_bytes(&self) -> u64 {
        self.rest_bytes
    }

    /// Chunks the section carries.
    pub fn chunks(&self) -> u64 {
        self.directory.len() as u64
    }

    /// Bytes of the whole section: the checkpoint, then each chunk with its head.
    pub fn section_bytes(&self) -> u64 {
        self.rest_bytes
            + self
                .directory
                .iter()
                .map(|c| CHUNK_HEAD_BYTES as u64 + c.bytes)
                .sum::<u64>()
    }

    fn get(&self, log: chatlog_storage::LogId, index: u64, what: &str) -> Result<Bytes, Error> {
        self.engine
            .get(log, index)
            .map_err(|source| Error::Storage {
                group: self.group,
                verb: "reading",
                subject: format!("{what} (entry {index}) of a checkpoint sent as a snapshot"),
                source,
            })
    }

    /// The next part of the section (a piece, or part of one, or a chunk's head); empty
    /// at its end. A chunk whose bytes do not match its directory record is an error.
    pub fn next_part(&mut self) -> Result<Bytes, Error> {
        let group = self.group;
        if self.rest_left > 0 {
            if self.cp_next >= self.cp_end {
                return Err(Error::Inconsistent {
                    group,
                    detail: format!(
                        "the checkpoint's pieces end {} bytes short of its state",
                        self.rest_left
                    ),
                });
            }
            let mut piece = self.get(self.cp_log, self.cp_next, "a checkpoint piece")?;
            self.cp_next += 1;
            if piece.len() as u64 > self.rest_left {
                // The rest of this piece is the directory, read already.
                piece.truncate(self.rest_left as usize);
            }
            self.rest_left -= piece.len() as u64;
            return Ok(piece);
        }
        while let Some(&c) = self.directory.get(self.chunk_at) {
            if !self.chunk_started {
                self.chunk_started = true;
                self.chunk_next = c.first_piece;
                self.chunk_seen = 0;
                self.chunk_crc = crc32fast::Hasher::new();
                return Ok(Bytes::copy_from_slice(&encode_chunk_head(
                    c.k, c.bytes, c.crc,
                )));
            }
            if self.chunk_next < c.first_piece + c.pieces {
                let piece = self.get(
                    self.chunk_log,
                    self.chunk_next,
                    &format!("a piece of index chunk {}", c.k),
                )?;
                self.chunk_next += 1;
                self.chunk_seen += piece.len() as u64;
                self.chunk_crc.update(&piece);
                if self.chunk_seen > c.bytes {
                    return Err(self.damaged(c));
                }
                if !piece.is_empty() {
                    return Ok(piece);
                }
                continue;
            }
            let crc = std::mem::replace(&mut self.chunk_crc, crc32fast::Hasher::new()).finalize();
            if self.chunk_seen != c.bytes || crc != c.crc {
                return Err(self.damaged_crc(c, crc));
            }
            self.chunk_at += 1;
            self.chunk_started = false;
        }
        Ok(Bytes::new())
    }

    fn damaged(&self, c: ChunkRef) -> Error {
        Error::Inconsistent {
            group: self.group,
            detail: format!(
                "index chunk {} of the checkpoint sent as a snapshot is damaged: more than the \
                 {} bytes its directory record says",
                c.k, c.bytes
            ),
        }
    }

    fn damaged_crc(&self, c: ChunkRef, crc: u32) -> Error {
        Error::Inconsistent {
            group: self.group,
            detail: format!(
                "index chunk {} of the checkpoint sent as a snapshot is damaged: {} bytes with \
                 CRC-32 {crc:08x}, its directory record says {} bytes with {:08x}",
                c.k, self.chunk_seen, c.bytes, c.crc
            ),
        }
    }
}

/// The directory at the end of the checkpoint pieces `[first, first + count)` (read from
/// the last pieces back, so the checkpoint itself is not read).
fn read_directory(
    engine: &Engine,
    group: GroupId,
    cp_log: chatlog_storage::LogId,
    first: u64,
    count: u64,
    directory_bytes: u64,
) -> Result<Vec<ChunkRef>, Error> {
    let mut tail: Vec<Bytes> = Vec::new();
    let mut held = 0u64;
    let mut index = first + count;
    while held < directory_bytes {
        if index == first {
            return Err(Error::Inconsistent {
                group,
                detail: format!(
                    "the checkpoint's pieces hold {held} bytes, its directory {directory_bytes}"
                ),
            });
        }
        index -= 1;
        let piece = engine.get(cp_log, index).map_err(|source| Error::Storage {
            group,
            verb: "reading",
            subject: format!("the checkpoint's chunk directory (entry {index})"),
            source,
        })?;
        held += piece.len() as u64;
        tail.push(piece);
    }
    let mut bytes = Vec::with_capacity(held as usize);
    for piece in tail.iter().rev() {
        bytes.extend_from_slice(piece);
    }
    let start = (held - directory_bytes) as usize;
    decode_directory(&bytes[start..]).map_err(|source| Error::Decode {
        group,
        subject: "the checkpoint's chunk directory".into(),
        source,
    })
}

/// Bytes read in order from a checked source (a staged snapshot stream).
pub trait ByteSource {
    /// The next bytes, at most `max` (at least one unless `max` is 0); an error at the
    /// source's end.
    fn next_bytes(&mut self, max: usize) -> Result<Bytes, Error>;
}

/// Appends pieces to one log, `per_batch` per write, each write awaited durable.
struct PieceWriter<'a> {
    engine: &'a Engine,
    group: GroupId,
    log: chatlog_storage::LogId,
    piece: usize,
    per_batch: usize,
    /// The index the next finished piece gets.
    next: u64,
    current: bytes::BytesMut,
    batch: Vec<Bytes>,
    batch_first: u64,
}

impl<'a> PieceWriter<'a> {
    fn new(engine: &'a Engine, group: GroupId, log: chatlog_storage::LogId) -> PieceWriter<'a> {
        let piece = piece_bytes(engine);
        let next = engine.bounds(log).map_or(1, |b| b.next.max(1));
        PieceWriter {
            engine,
            group,
            log,
            piece,
            per_batch: (engine.write_batch_bytes_max() / 2 / piece).max(1),
            next,
            current: bytes::BytesMut::new(),
            batch: Vec::new(),
            batch_first: next,
        }
    }

    /// Adds `bytes` to the piece being filled, finishing each full one.
    async fn push(&mut self, mut bytes: &[u8]) -> Result<(), Error> {
        while !bytes.is_empty() {
            let n = (self.piece - self.current.len()).min(bytes.len());
            self.current.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.current.len() == self.piece {
                self.end_piece(false).await?;
            }
        }
        Ok(())
    }

    /// Finishes the piece being filled (an empty one only if `even_empty`).
    async fn end_piece(&mut self, even_empty: bool) -> Result<(), Error> {
        if self.current.is_empty() && !even_empty {
            return Ok(());
        }
        self.batch.push(self.current.split().freeze());
        self.next += 1;
        if self.batch.len() >= self.per_batch {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the finished pieces and waits until they are durable.
    async fn flush(&mut self) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.append_many(self.log, self.batch_first, self.batch.iter());
        self.engine
            .write(&batch)
            .await
            .map_err(|source| Error::Storage {
                group: self.group,
                verb: "writing",
                subject: "the pieces of a received checkpoint".into(),
                source,
            })?;
        self.batch.clear();
        self.batch_first = self.next;
        Ok(())
    }
}

/// A received checkpoint written, not yet published ([`write_section`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpublished {
    /// The pointer that names it.
    pub pointer: Pointer,
    /// The chunk log's first entry it references (what its publish keeps).
    pub keep_chunks_from: u64,
}

/// Where the next pieces of group `group`'s checkpoint and chunk logs will go: what
/// [`discard_from`] drops if a write from here is abandoned.
pub fn next_pieces(engine: &Engine, group: GroupId) -> Result<PiecesFrom, Error> {
    let (chunk_log, cp_log) = logs(group)?;
    let next = |log| engine.bounds(log).map_or(1, |b| b.next.max(1));
    Ok(PiecesFrom {
        checkpoint: next(cp_log),
        chunks: next(chunk_log),
    })
}

/// Writes a snapshot stream's checkpoint section, read from `source` (`rest_bytes` of
/// checkpoint, then `chunks` chunk records), as this replica's pieces: each chunk into
/// the index chunk log (checked against its head's length and CRC-32 as it is copied),
/// the checkpoint and a directory of where the chunks went into the checkpoint log, all
/// durable when it returns. Publishes nothing: the caller checks the pieces (loads them)
/// and then publishes the pointer ([`publish`]) or drops them ([`discard_from`]). Holds
/// one piece and one batch of them at a time. Must run under the group's checkpoint lock.
pub async fn write_section<S: ByteSource>(
    engine: &Engine,
    group: GroupId,
    source: &mut S,
    rest_bytes: u64,
    chunks: u64,
) -> Result<Unpublished, Error> {
    let (chunk_log, cp_log) = logs(group)?;
    let mut cp = PieceWriter::new(engine, group, cp_log);
    let first = cp.next;
    let mut left = rest_bytes;
    while left > 0 {
        let bytes = source.next_bytes(left.min(cp.piece as u64) as usize)?;
        left -= bytes.len() as u64;
        cp.push(&bytes).await?;
    }
    cp.end_piece(false).await?;
    let mut ch = PieceWriter::new(engine, group, chunk_log);
    let mut directory = Vec::with_capacity(chunks.min(1 << 16) as usize);
    for _ in 0..chunks {
        let mut head = [0u8; CHUNK_HEAD_BYTES];
        let mut at = 0;
        while at < CHUNK_HEAD_BYTES {
            let b = source.next_bytes(CHUNK_HEAD_BYTES - at)?;
            head[at..at + b.len()].copy_from_slice(&b);
            at += b.len();
        }
        let (k, bytes, crc) = decode_chunk_head(&head);
        if let Some(prev) = directory.last().map(|c: &ChunkRef| c.k)
            && k != prev + 1
        {
            return Err(Error::Inconsistent {
                group,
                detail: format!("a received checkpoint's chunk {k} follows chunk {prev}"),
            });
        }
        let first_piece = ch.next;
        let mut hasher = crc32fast::Hasher::new();
        let mut left = bytes;
        while left > 0 {
            let b = source.next_bytes(left.min(ch.piece as u64) as usize)?;
            left -= b.len() as u64;
            hasher.update(&b);
            ch.push(&b).await?;
        }
        ch.end_piece(bytes == 0).await?;
        let got = hasher.finalize();
        if got != crc {
            return Err(Error::Inconsistent {
                group,
                detail: format!(
                    "a received checkpoint's index chunk {k} has CRC-32 {got:08x}, its record \
                     says {crc:08x}"
                ),
            });
        }
        directory.push(ChunkRef {
            k,
            first_piece,
            pieces: ch.next - first_piece,
            bytes,
            crc,
        });
    }
    ch.flush().await?;
    let directory_bytes = encode_directory(&directory);
    cp.push(&directory_bytes).await?;
    cp.end_piece(false).await?;
    cp.flush().await?;
    Ok(Unpublished {
        pointer: Pointer::Incremental {
            first,
            count: cp.next - first,
            checkpoint: rest_bytes,
            directory: directory_bytes.len() as u64,
        },
        keep_chunks_from: directory.first().map_or(ch.next, |c| c.first_piece),
    })
}

/// Drops the checkpoint and chunk pieces from `from` on (an abandoned [`write_section`]:
/// nothing published names them), and waits until that is durable.
pub async fn discard_from(engine: &Engine, group: GroupId, from: PiecesFrom) -> Result<(), Error> {
    let (chunk_log, cp_log) = logs(group)?;
    let mut batch = WriteBatch::new();
    for (log, at) in [(cp_log, from.checkpoint), (chunk_log, from.chunks)] {
        let Some(b) = engine.bounds(log) else {
            continue;
        };
        if b.next <= at {
            continue;
        }
        if b.first < at {
            batch.truncate_after(log, at - 1);
        } else {
            // Nothing below `at` is held: empty the log, to continue where it ended.
            batch.purge_before(log, b.next);
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    engine.write(&batch).await.map_err(|source| Error::Storage {
        group,
        verb: "dropping",
        subject: "the pieces of an abandoned checkpoint".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::index_chunks::CHUNK_ENTRIES;
    use crate::chat::{Command, Outcome};
    use std::sync::Arc;

    const GROUP: GroupId = 3;

    /// Header bytes as `state_machine` writes them (version, no applied id, a one-voter
    /// membership), then the state.
    fn wrap(state: &[u8]) -> Vec<u8> {
        let mut out = vec![crate::state_machine::SNAPSHOT_VERSION, 0, 0];
        let voters: std::collections::BTreeSet<u64> = [1].into();
        crate::codec::put_membership(
            &mut out,
            &crate::types::Membership::new_with_defaults(vec![voters], []),
        );
        out.extend_from_slice(&(state.len() as u64).to_le_bytes());
        out.extend_from_slice(state);
        out
    }

    struct Chat {
        state: GroupState,
        user: u64,
        chat: u64,
        index: u64,
    }

    impl Chat {
        fn new() -> Chat {
            let mut state = GroupState::new(GROUP);
            let (user, chat) = crate::chat::index_chunks::tests::user_and_chat(&mut state);
            Chat {
                state,
                user,
                chat,
                index: 2,
            }
        }

        /// `n` more posts, one per Raft entry, a minute apart (the dedupe window stays
        /// small).
        fn post(&mut self, n: u64) {
            for _ in 0..n {
                self.index += 1;
                crate::chat::index_chunks::tests::post(
                    &mut self.state,
                    self.user,
                    self.chat,
                    self.index,
                );
            }
        }
    }

    fn engine(dir: &std::path::Path) -> Arc<Engine> {
        let mut config = chatlog_storage::Config::new(dir);
        config.segment_bytes = 8 << 20;
        Arc::new(Engine::open(config).expect("engine opens"))
    }

    /// Writes an incremental checkpoint of `c`; returns the bytes it wrote, after
    /// checking it reads back as the whole state.
    async fn checkpoint(engine: &Engine, c: &Chat, written: &mut ChunkDirectory) -> u64 {
        let plan = plan(engine, GROUP, &c.state, c.index, written, wrap).expect("plans");
        let bytes = plan.bytes_written();
        write(engine, GROUP, plan, &Keeper::default())
            .await
            .expect("writes");
        let back = crate::state_machine::read_checkpoint(engine, GROUP)
            .expect("reads")
            .expect("a checkpoint");
        assert!(
            back == wrap(&c.state.encode()),
            "reads back as the whole state"
        );
        bytes
    }

    /// A checkpoint after N more events writes O(N) bytes whatever the history: the same
    /// N after a history three times longer writes about the same, far less than the
    /// whole state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_writes_what_is_new_not_the_history() {
        let new_events = CHUNK_ENTRIES + 500;
        let mut second = Vec::new();
        for chunks in [4, 12] {
            let dir = tempfile::tempdir().unwrap();
            let engine = engine(dir.path());
            let mut c = Chat::new();
            c.post(chunks * CHUNK_ENTRIES);
            let mut written = ChunkDirectory::new();
            let first = checkpoint(&engine, &c, &mut written).await;
            let whole = c.state.encode().len() as u64;
            assert!(
                first >= whole * 9 / 10,
                "the first one writes everything: {first}"
            );
            c.post(new_events);
            let bytes = checkpoint(&engine, &c, &mut written).await;
            let whole = c.state.encode().len() as u64;
            eprintln!(
                "history {} events: checkpoint after {new_events} more wrote {bytes} bytes \
                 (whole state {whole})",
                chunks * CHUNK_ENTRIES
            );
            assert!(bytes < 3 * 16 * new_events, "O(new events): {bytes}");
            second.push((bytes, whole));
            // The chunk log holds each chunk once.
            let log = ids::index_chunk_log(GROUP).unwrap();
            let b = engine.bounds(log).unwrap();
            assert_eq!(b.first, 1);
            let held: u64 = written.values().map(|c| c.pieces).sum();
            assert_eq!(b.next - b.first, held, "no chunk written twice");
        }
        let (small, large) = (second[0], second[1]);
        assert!(
            large.1 > 2 * small.1,
            "three times the history: {small:?} {large:?}"
        );
        assert!(
            large.0 < small.0 + small.0 / 5,
            "the same new events cost the same: {small:?} {large:?}"
        );
    }

    /// Retention moves the region up: chunks below it are purged from the chunk log,
    /// deletes inside chunks survive, and a replica that lost its directory (a restart
    /// after a whole checkpoint) rewrites the region once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_and_deletes_and_a_fresh_directory() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let mut c = Chat::new();
        c.post(6 * CHUNK_ENTRIES);
        let mut written = ChunkDirectory::new();
        checkpoint(&engine, &c, &mut written).await;
        c.index += 1;
        let o = c.state.apply(
            &Command::Delete {
                chat: c.chat,
                sender: c.user,
                target: 2 * CHUNK_ENTRIES,
            },
            c.index * 60_000,
            c.index,
            0,
        );
        assert!(matches!(o, Outcome::Event { .. }), "{o:?}");
        c.state.trim_below(3 * CHUNK_ENTRIES + 5);
        checkpoint(&engine, &c, &mut written).await;
        assert_eq!(written.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
        let log = ids::index_chunk_log(GROUP).unwrap();
        assert_eq!(engine.bounds(log).unwrap().first, written[&4].first_piece);
        // A delete in a chunk that stays.
        c.index += 1;
        let o = c.state.apply(
            &Command::Delete {
                chat: c.chat,
                sender: c.user,
                target: 4 * CHUNK_ENTRIES + 3,
            },
            c.index * 60_000,
            c.index,
            0,
        );
        assert!(matches!(o, Outcome::Event { .. }), "{o:?}");
        checkpoint(&engine, &c, &mut written).await;
        let mut fresh = ChunkDirectory::new();
        c.post(10);
        checkpoint(&engine, &c, &mut fresh).await;
        assert_eq!(fresh.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
        drop(written);
        Arc::try_unwrap(engine)
            .expect("one handle")
            .close()
            .expect("closes");
    }
}
