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
//! it, so the pointer never names a missing piece or chunk.

use std::collections::BTreeMap;

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

/// Writes `plan` (module docs, "Order of writes") and waits until the pointer is durable.
pub async fn write(engine: &Engine, group: GroupId, plan: Plan) -> Result<(), Error> {
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
    let mut batch = WriteBatch::new();
    batch.put_meta(cp_log, ids::META_CHECKPOINT, &pointer.encode());
    batch.purge_before(cp_log, first);
    batch.purge_before(chunk_log, plan.keep_chunks_from);
    engine.write(&batch).await.map_err(storage_err)
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
        write(engine, GROUP, plan).await.expect("writes");
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
