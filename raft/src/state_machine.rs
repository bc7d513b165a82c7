//! A group's state machine: openraft's `RaftStateMachine` and `RaftSnapshotBuilder` over
//! the chat rules in `chat/`.
//!
//! What it owns: driving `chat::GroupState` with committed entries (each `ChatBatch` is a
//! batch of chat commands; the reply lists one `Outcome` per command), the applied log
//! id and membership, durable checkpoints of the whole state in the group's checkpoint
//! log, and snapshots. It shares the state with readers through [`GroupShared`], so a
//! history read never queues behind `apply`. What it must not do: wait for an fdatasync
//! in `apply` (the periodic checkpoint, every [`SmConfig::checkpoint_every_entries`]
//! entries, is encoded there and written by `crate::checkpointer` in the background), or
//! reorder entries.
//!
//! Checkpoints. The periodic checkpoint (and the one written with a snapshot) is
//! incremental (`crate::checkpoint_chunks`, `chat::index_chunks`): the per-chat and
//! per-user indexes are cut by Raft index into immutable chunks, each written once into
//! `ids::index_chunk_log(g)`; a checkpoint is the state outside the chunks plus a
//! directory of the chunks it uses, written as pieces into `ids::checkpoint_log(g)`,
//! then one batch sets the meta key `ids::META_CHECKPOINT` to point at them (pointer
//! v2) and purges older pieces and chunks no longer used. A whole-state checkpoint
//! (`write_checkpoint_bytes`: `chatlog restore`, installs staged by older code) writes the whole
//! encoding (`GroupState::encode`) and a v1 pointer. The engine makes a batch durable
//! only after the ones before it, so the pointer never names missing pieces. On open the
//! state machine loads either form and reports its applied id; openraft re-applies
//! `(checkpoint, committed]` from the log (`save_committed`). [`read_checkpoint`] always
//! returns the whole form (backups carry whole states; snapshots do not, s9snap).
//!
//! A snapshot openraft asks for (`get_snapshot_builder`; the policy is `Never`, so only for
//! retention's purge, a lagging replica, or `trigger().snapshot()`, which `chatlog admin
//! snapshot` pulls) is the durable incremental checkpoint at the applied index: reused
//! when it is there, written when not. Backups read the durable checkpoint
//! ([`read_checkpoint`], the whole form) and restore writes one
//! ([`write_checkpoint_bytes`]); older code's whole checkpoints load too.
//!
//! Snapshots (s9snap; `SnapshotData`, `crate::snapshot_stream`): a handle, never bytes:
//! the durable incremental checkpoint's meta and pointer
//! (`checkpoint_chunks::CheckpointHandle`, recorded in the replica's
//! `checkpoint_chunks::Keeper` whenever a pointer becomes durable) and the group's log.
//! The transport reads the checkpoint's pieces and the retained log range (the entries
//! from the first one this replica holds, history below openraft's purge mark included,
//! to the snapshot's index) from the engine while it streams them in chunks; no encoding
//! of the whole state is made or kept, and `get_current_snapshot` hands out the newest
//! durable checkpoint (never one ahead of the applied state). A received snapshot is
//! staged on disk while it arrives and installed by
//! `snapshot_stream::StagedSnapshot::install`: its checkpoint section written as this
//! replica's own checkpoint pieces and loaded from them as a restart does (so the state
//! installed is what a restart would load), then an install intent, the pointer, the
//! range as the log's history below the purge mark openraft sets right after; a crash
//! anywhere after the intent is finished at the next open
//! (`snapshot_stream::finish_interrupted_install`), one before it drops the pieces, so a
//! replica never has a checkpoint without its history (the order and why it is safe:
//! `snapshot_stream`'s docs).

use std::io;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use chatlog_storage::{Engine, WriteBatch};
use futures_util::{Stream, StreamExt};
use openraft::OptionalSend;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use tokio::sync::watch;

use crate::chat::retention::RetentionPolicy;
use crate::chat::{DecodedBatch, GroupState, Outcome, RefusalCode};
use crate::checkpoint_chunks::{CheckpointHandle, ChunkDirectory, Keeper, Pointer};
use crate::checkpointer::{Checkpointer, Reservation};
use crate::clock::BatchClock;
use crate::codec::{self, DecodeError, Reader};
use crate::error::Error;
use crate::feed::{Feed, FeedRead};
use crate::ids;
use crate::log_store::LogReader;
use crate::types::{
    ChatBatchReply, Entry, EntryPayload, GroupId, LogId, Snapshot, SnapshotMeta, StoredMembership,
    TypeConfig,
};

/// A snapshot as openraft handles it: a handle, never the snapshot's bytes in one value
/// (`crate::snapshot_stream`).
pub use crate::snapshot_stream::SnapshotData;

/// Version byte of the snapshot and checkpoint header.
pub const SNAPSHOT_VERSION: u8 = 2;
/// Bytes of state per checkpoint chunk (one engine entry each).
pub const CHECKPOINT_CHUNK_BYTES: usize = 1 << 20;

/// Knobs of a group's state machine.
#[derive(Debug, Clone, Copy)]
pub struct SmConfig {
    /// Entries applied between two checkpoints. A restart re-applies at most about this
    /// many entries per group (plus what arrived since the last one).
    pub checkpoint_every_entries: u64,
    /// The policy this node's `--retain-*` flags seed (s8retention): proposed for a
    /// group that has no replicated policy yet (`crate::retention`). Apply never reads
    /// it: the indexes follow the group's replicated policy (`chat::retention`).
    pub retention: RetentionPolicy,
}

impl Default for SmConfig {
    fn default() -> SmConfig {
        SmConfig {
            checkpoint_every_entries: 20_000,
            retention: RetentionPolicy::keep_all(),
        }
    }
}

/// What readers share with the state machine of one group.
#[derive(Debug)]
pub struct GroupShared {
    group: GroupId,
    state: RwLock<GroupState>,
    /// The last applied Raft index (0 before anything), for waiters and subscribers.
    applied: watch::Sender<u64>,
    /// Timestamps for the batches this replica proposes: never below an applied one.
    clock: BatchClock,
    /// Which chats and users moved in recently applied entries (`crate::feed`); derived
    /// per replica, not in the checkpoint. Updated before `applied` moves.
    feed: Mutex<Feed>,
    /// The applied index of the durable checkpoint (retention never purges above it).
    checkpointed: std::sync::atomic::AtomicU64,
}

impl GroupShared {
    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Read access to the applied state. Hold it briefly: `apply` waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, GroupState> {
        // A poisoned lock means apply panicked; the group is stopped anyway.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the last applied Raft index.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The clock that stamps this replica's proposals (`crate::clock`).
    pub fn clock(&self) -> &BatchClock {
        &self.clock
    }

    /// The chats and users that moved in the entries applied after `after`
    /// (`crate::feed`). The state read afterwards holds at least what it names.
    pub fn changes_after(&self, after: u64) -> FeedRead {
        self.feed().changes_after(after)
    }

    /// The applied Raft index of the latest durable checkpoint (0 before the first).
    pub fn checkpointed(&self) -> u64 {
        self.checkpointed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_checkpointed(&self, index: u64) {
        self.checkpointed
            .store(index, std::sync::atomic::Ordering::Release);
    }

    fn feed(&self) -> std::sync::MutexGuard<'_, Feed> {
        self.feed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The durable part of the state's header: applied id and membership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Header {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

impl Header {
    fn encode_with(&self, state: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(state.len() + 128);
        out.push(SNAPSHOT_VERSION);
        put_optional_log_id(&mut out, self.last_applied.as_ref());
        put_optional_log_id(&mut out, self.last_membership.log_id().as_ref());
        codec::put_membership(&mut out, self.last_membership.membership());
        out.extend_from_slice(&(state.len() as u64).to_le_bytes());
        out.extend_from_slice(state);
        out
    }

    fn decode(bytes: &[u8]) -> Result<(Header, GroupState), DecodeError> {
        Header::decode_with(bytes, GroupState::decode)
    }

    /// Like [`Header::decode`], the state bytes decoded by `state` (s7raft: an
    /// incremental checkpoint's state is decoded with its chunks).
    fn decode_with(
        bytes: &[u8],
        state: impl FnOnce(&[u8]) -> Result<GroupState, DecodeError>,
    ) -> Result<(Header, GroupState), DecodeError> {
        let mut r = Reader::new("snapshot", bytes);
        let version = r.u8()?;
        if version != SNAPSHOT_VERSION {
            return Err(DecodeError::new(
                "snapshot",
                format!("version {version}, expected {SNAPSHOT_VERSION}"),
            ));
        }
        let last_applied = optional_log_id(&mut r)?;
        let membership_log_id = optional_log_id(&mut r)?;
        let membership = r.membership()?;
        let len = r.u64()? as usize;
        let state = state(r.bytes(len)?)?;
        r.finish()?;
        Ok((
            Header {
                last_applied,
                last_membership: StoredMembership::new(membership_log_id, membership),
            },
            state,
        ))
    }

    fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
        }
    }
}

fn put_optional_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
    match id {
        Some(id) => {
            out.push(1);
            codec::put_log_id(out, id);
        }
        None => out.push(0),
    }
}

fn optional_log_id(r: &mut Reader<'_>) -> Result<Option<LogId>, DecodeError> {
    if r.bool()? {
        Ok(Some(r.log_id()?))
    } else {
        Ok(None)
    }
}

/// The state machine of one group.
#[derive(Debug)]
pub struct ChatStateMachine {
    group: GroupId,
    engine: Arc<Engine>,
    config: SmConfig,
    header: Header,
    shared: Arc<GroupShared>,
    applied_since_checkpoint: u64,
    /// The durable incremental checkpoint (the snapshot openraft is given: meta and
    /// pointer, no bytes) and the pins of snapshots being sent (`crate::checkpoint_chunks`).
    keeper: Arc<Keeper>,
    /// The group's log, for the entries a snapshot carries (`None`: state only).
    log: Option<LogReader>,
    /// Writes the periodic checkpoint off the apply path; its lock orders every
    /// checkpoint write of the group (`crate::checkpointer`).
    checkpointer: Checkpointer,
    /// Where snapshots sent to this replica are staged (`crate::snapshot_stream`).
    staging: Option<Arc<crate::snapshot_stream::Staging>>,
    /// The index chunks this replica wrote (`crate::checkpoint_chunks`): periodic
    /// checkpoints are incremental and write only the chunks missing here.
    chunks: ChunkDirectory,
}

impl ChatStateMachine {
    /// Opens group `group`'s state machine, loading its latest checkpoint if any.
    pub fn open(engine: Arc<Engine>, group: GroupId, config: SmConfig) -> Result<Self, Error> {
        // `read_checkpoint` refuses a group id too large for the engine's log ids.
        let (header, state, chunks, pointer) =
            match checkpoint_unless_lost_to_damage(&engine, group)? {
                None => (
                    Header::default(),
                    GroupState::new(group),
                    ChunkDirectory::new(),
                    None,
                ),
                // Written by older code or by a restore: loads; the first snapshot asked
                // for writes an incremental one.
                Some(Stored::Whole(data)) => {
                    let (header, state) =
                        Header::decode(&data).map_err(|source| Error::Decode {
                            group,
                            subject: "the checkpoint".into(),
                            source,
                        })?;
                    (header, state, ChunkDirectory::new(), None)
                }
                Some(Stored::Incremental {
                    header,
                    state,
                    directory,
                    pointer,
                }) => (header, *state, directory, Some(pointer)),
            };
        if state.group() != group {
            return Err(Error::Inconsistent {
                group,
                detail: format!("checkpoint belongs to group {}", state.group()),
            });
        }
        // Issue 9 (session 6): a checkpoint ahead of a damaged log is set aside when the
        // log can rebuild the state (`repair::rebuild_state_from_log`).
        let applied = header.last_applied.map_or(0, |l| l.index);
        let keeper = Arc::new(Keeper::default());
        let (header, state, chunks) = if crate::repair::rebuild_state_from_log(
            &engine, group, applied,
        ) {
            tracing::warn!(
                group,
                applied,
                status = "repairing",
                "checkpoint ahead of the damaged Raft log set aside: the state is rebuilt from the log and the leader's entries"
            );
            (
                Header::default(),
                GroupState::new(group),
                ChunkDirectory::new(),
            )
        } else {
            if let Some(pointer) = pointer {
                keeper.set_current(header.snapshot_meta(), pointer);
            }
            (header, state, chunks)
        };
        let applied_index = header.last_applied.map_or(0, |l| l.index);
        let staging = crate::snapshot_stream::Staging::new(Arc::clone(&engine), group);
        Ok(ChatStateMachine {
            group,
            staging,
            engine,
            config,
            header,
            shared: Arc::new(GroupShared {
                group,
                clock: BatchClock::new(),
                state: RwLock::new(state),
                applied: watch::Sender::new(applied_index),
                feed: Mutex::new(Feed::new(applied_index)),
                checkpointed: applied_index.into(),
            }),
            log: None,
            checkpointer: Checkpointer::new(group),
            applied_since_checkpoint: 0,
            keeper,
            chunks,
        })
    }

    /// Gives the state machine its group's log: snapshots then carry the retained log
    /// range and installing one writes it (module docs).
    pub fn with_log(mut self, log: LogReader) -> Self {
        self.log = Some(log);
        self
    }

    /// Where snapshots sent to this replica are staged (the peer server writes received
    /// chunks there, through `Raft::with_state_machine`).
    pub fn staging(&self) -> Option<Arc<crate::snapshot_stream::Staging>> {
        self.staging.clone()
    }

    /// What readers share with this state machine.
    pub fn shared(&self) -> Arc<GroupShared> {
        Arc::clone(&self.shared)
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        self.header.last_applied
    }

    /// Writes the current state as the group's checkpoint and waits until it is durable
    /// (after any background checkpoint in flight).
    pub async fn checkpoint(&mut self) -> Result<(), Error> {
        self.checkpointer.finish().await?;
        self.write_incremental().await?;
        self.applied_since_checkpoint = 0;
        Ok(())
    }

    /// Plans the incremental checkpoint of the state at the applied index
    /// (`crate::checkpoint_chunks`): encodes the chunks not written yet and the state
    /// outside the chunks, under the state's read lock.
    fn plan_incremental(&mut self) -> Result<crate::checkpoint_chunks::Plan, Error> {
        let applied = self.header.last_applied.map_or(0, |l| l.index);
        let header = &self.header;
        let state = self.shared.read();
        crate::checkpoint_chunks::plan(
            &self.engine,
            self.group,
            &state,
            applied,
            &mut self.chunks,
            |rest| header.encode_with(rest),
        )
    }

    /// Writes an incremental checkpoint now and waits until it is durable (after any
    /// background checkpoint: the pointer only moves forward); returns its pointer.
    async fn write_incremental(&mut self) -> Result<Pointer, Error> {
        let lock = Arc::clone(self.checkpointer.lock());
        let _writing = lock.lock().await;
        let applied = self.header.last_applied.map_or(0, |l| l.index);
        let plan = self.plan_incremental()?;
        let pointer =
            crate::checkpoint_chunks::write(&self.engine, self.group, plan, &self.keeper).await?;
        self.shared.set_checkpointed(applied);
        self.keeper
            .set_current(self.header.snapshot_meta(), pointer);
        Ok(pointer)
    }

    /// Encodes the state at the applied index and has `crate::checkpointer` write it in
    /// the background; if a checkpoint write is still going, tries again after the next
    /// entries. Reports a failed earlier background write (fatal for the group).
    fn checkpoint_in_background(&mut self) -> Result<(), Error> {
        let Reservation::Free(guard) = self.checkpointer.reserve()? else {
            return Ok(());
        };
        // Incremental (s7raft): the chunks completed since the last checkpoint and the
        // state outside the chunks, not the whole state (`crate::checkpoint_chunks`).
        let plan = self.plan_incremental()?;
        let applied = self.header.last_applied.map_or(0, |l| l.index);
        let meta = self.header.snapshot_meta();
        let (engine, shared, group) = (Arc::clone(&self.engine), self.shared(), self.group);
        let keeper = Arc::clone(&self.keeper);
        self.checkpointer.start(guard, async move {
            let pointer = crate::checkpoint_chunks::write(&engine, group, plan, &keeper).await?;
            shared.set_checkpointed(applied);
            keeper.set_current(meta, pointer);
            Ok(())
        });
        self.applied_since_checkpoint = 0;
        Ok(())
    }

    fn apply_entry(&mut self, entry: Entry) -> Result<ChatBatchReply, Error> {
        if let Some(applied) = self.header.last_applied
            && entry.log_id.index <= applied.index
        {
            return Err(Error::Inconsistent {
                group: self.group,
                detail: format!("apply of {} after {applied}", entry.log_id),
            });
        }
        let index = entry.log_id.index;
        // What the byte retention policy counts (deterministic: the entry's own bytes).
        let entry_bytes = codec::ENTRY_HEADER_BYTES as u64
            + match &entry.payload {
                EntryPayload::Normal(b) => b.0.len() as u64,
                _ => 0,
            };
        tracing::debug!(
            group = self.group,
            term = entry.log_id.leader_id.term,
            leader = entry.log_id.leader_id.node_id,
            index,
            digest = codec::payload_digest(&entry),
            "apply"
        );
        let outcomes = match entry.payload {
            EntryPayload::Blank => Vec::new(),
            EntryPayload::Membership(m) => {
                self.header.last_membership = StoredMembership::new(Some(entry.log_id), m);
                Vec::new()
            }
            EntryPayload::Normal(batch) => match DecodedBatch::parse(batch.0) {
                // Proposers always encode valid batches; a bad one is refused as a whole
                // (deterministically, on every replica) rather than stopping the group.
                Err(e) => vec![Outcome::refused(RefusalCode::BadRequest, e.to_string())],
                Ok(batch) => {
                    self.shared.clock.observe(batch.timestamp_ms);
                    let mut out = Vec::with_capacity(batch.len());
                    let mut state = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
                    for pos in 0..batch.len() {
                        // Posts, the bulk of the log, are applied from their fields in
                        // place; everything else is decoded.
                        if let Some(post) = batch.post_fields(pos) {
                            out.push(state.apply_post(&post, batch.timestamp_ms, index, pos));
                            continue;
                        }
                        out.push(match batch.command(pos) {
                            Ok(cmd) => state.apply(&cmd, batch.timestamp_ms, index, pos),
                            Err(e) => Outcome::refused(RefusalCode::BadRequest, e.to_string()),
                        });
                    }
                    out
                }
            },
        };
        // Under the group's replicated policy only (s8retention), never this node's flags.
        self.shared
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .note_applied_entry(index, entry_bytes);
        self.header.last_applied = Some(entry.log_id);
        self.applied_since_checkpoint += 1;
        Ok(ChatBatchReply {
            log_index: index,
            outcomes,
        })
    }
}

/// Issue 9 (session 6): [`read_checkpoint`], except that a checkpoint whose chunks the
/// engine's damage cut dropped (`Engine::damage`) is set aside with a warning: the state
/// then starts empty and openraft re-applies the group's log from its start (a group
/// whose log was also purged cannot, and stops with openraft's error naming the index).
fn checkpoint_unless_lost_to_damage(
    engine: &Engine,
    group: GroupId,
) -> Result<Option<Stored>, Error> {
    match read_stored(engine, group) {
        Err(e)
            if engine.damage().is_some_and(|d| {
                [ids::checkpoint_log(group), ids::index_chunk_log(group)]
                    .into_iter()
                    .flatten()
                    .any(|log| d.lost_from.contains_key(&log))
            }) =>
        {
            tracing::warn!(group, error = %e, status = "damaged", "checkpoint lost to storage damage: the state is rebuilt from the log");
            Ok(None)
        }
        other => other,
    }
}

/// Reads group `group`'s latest durable checkpoint (the snapshot bytes: header and
/// state, see the module docs) from the engine, every chunk checked by the engine's read;
/// `None` when none was written. The whole checkpoint is held in memory: it is the
/// encoding of a state the node holds in memory anyway.
pub fn read_checkpoint(engine: &Engine, group: GroupId) -> Result<Option<Vec<u8>>, Error> {
    Ok(read_stored(engine, group)?.map(|stored| match stored {
        Stored::Whole(data) => data,
        // Assembled into the whole form: backups and snapshots carry whole states.
        Stored::Incremental { header, state, .. } => header.encode_with(&state.encode()),
    }))
}

/// A durable checkpoint as stored.
enum Stored {
    /// Whole: the bytes (header and state).
    Whole(Vec<u8>),
    /// Incremental (`crate::checkpoint_chunks`), decoded with its chunks.
    Incremental {
        header: Header,
        state: Box<GroupState>,
        directory: ChunkDirectory,
        pointer: Pointer,
    },
}

/// Reads group `group`'s latest durable checkpoint in the form it is stored.
fn read_stored(engine: &Engine, group: GroupId) -> Result<Option<Stored>, Error> {
    let log = ids::checkpoint_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let mut attempts = 0;
    loop {
        let Some(ptr) = engine.meta(log, ids::META_CHECKPOINT) else {
            return Ok(None);
        };
        let pointer = Pointer::decode(&ptr).map_err(|source| Error::Decode {
            group,
            subject: "the checkpoint pointer".into(),
            source,
        })?;
        match read_checkpoint_at(engine, group, log, pointer) {
            Ok(data) => return Ok(Some(data)),
            // A checkpoint written meanwhile purged the chunks this pointer named (a
            // backup reading while the group checkpoints): read the new one.
            Err(_)
                if attempts < CHECKPOINT_READ_RETRIES_MAX
                    && engine
                        .meta(log, ids::META_CHECKPOINT)
                        .is_some_and(|p| p != ptr) =>
            {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How many times [`read_checkpoint`] starts again because a newer checkpoint replaced
/// the one it was reading; each newer one is a full checkpoint write, so more than a few
/// in a row means something writes checkpoints in a loop.
const CHECKPOINT_READ_RETRIES_MAX: u32 = 8;

/// The checkpoint `pointer` names in `log` (published or not yet: an install loads the
/// pieces it wrote before it publishes them).
fn read_checkpoint_at(
    engine: &Engine,
    group: GroupId,
    log: u64,
    pointer: Pointer,
) -> Result<Stored, Error> {
    let decode_err = |subject: &str, source| Error::Decode {
        group,
        subject: subject.into(),
        source,
    };
    let data = read_pieces(engine, group, log, pointer.pieces())?;
    let Pointer::Incremental { checkpoint, .. } = pointer else {
        return Ok(Stored::Whole(data));
    };
    let (checkpoint, directory) = data.split_at(checkpoint as usize);
    let mut loaded = None;
    let (header, state) = Header::decode_with(checkpoint, |state_bytes| {
        let chunks = crate::checkpoint_chunks::load_chunks(engine, group, state_bytes, directory)
            .map_err(|e| DecodeError::new("incremental checkpoint", e.to_string()))?;
        let state = crate::chat::index_chunks::decode_outside(state_bytes, chunks.chunks)?;
        loaded = Some(chunks.directory);
        Ok(state)
    })
    .map_err(|e| decode_err("the incremental checkpoint", e))?;
    Ok(Stored::Incremental {
        header,
        state: Box::new(state),
        directory: loaded.unwrap_or_default(),
        pointer,
    })
}

/// A loaded incremental checkpoint: header, state and chunk directory.
type LoadedCheckpoint = (Header, GroupState, ChunkDirectory);

/// Loads the incremental checkpoint `pointer` names as a restart does, and checks it is
/// the snapshot `meta` of group `group` says.
fn load_snapshot_checkpoint(
    engine: &Engine,
    group: GroupId,
    pointer: Pointer,
    meta: &SnapshotMeta,
) -> Result<LoadedCheckpoint, Error> {
    let log = ids::checkpoint_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let Stored::Incremental {
        header,
        state,
        directory,
        ..
    } = read_checkpoint_at(engine, group, log, pointer)?
    else {
        return Err(Error::Inconsistent {
            group,
            detail: "a snapshot's checkpoint is not incremental".into(),
        });
    };
    if header.snapshot_meta() != *meta || state.group() != group {
        return Err(Error::Inconsistent {
            group,
            detail: format!(
                "snapshot data says {:?} / {:?} of group {}, its meta says {meta}",
                header.last_applied,
                header.last_membership,
                state.group()
            ),
        });
    }
    Ok((header, *state, directory))
}

/// Writes `state`, applied through `meta`'s last log id, as group `group`'s checkpoint in
/// the incremental form (every chunk written afresh) and waits until it is durable;
/// returns its pointer. For tests and benches that need a stored snapshot without a
/// running group.
pub async fn write_incremental_checkpoint(
    engine: &Engine,
    group: GroupId,
    meta: &SnapshotMeta,
    state: &GroupState,
) -> Result<Pointer, Error> {
    let header = Header {
        last_applied: meta.last_log_id,
        last_membership: meta.last_membership.clone(),
    };
    let applied = meta.last_log_id.map_or(0, |l| l.index);
    let plan = crate::checkpoint_chunks::plan(
        engine,
        group,
        state,
        applied,
        &mut ChunkDirectory::new(),
        |rest| header.encode_with(rest),
    )?;
    crate::checkpoint_chunks::write(engine, group, plan, &Keeper::default()).await
}

/// The checkpoint log's pieces `(first, count, bytes)`, concatenated.
fn read_pieces(
    engine: &Engine,
    group: GroupId,
    log: u64,
    (first, count, bytes): (u64, u64, u64),
) -> Result<Vec<u8>, Error> {
    let mut data = Vec::with_capacity(bytes as usize);
    let mut next = first;
    while next < first + count {
        let chunks = engine
            .read(log, next..first + count, 16 << 20)
            .map_err(|source| Error::Storage {
                group,
                verb: "reading",
                subject: format!("checkpoint chunks from {next}"),
                source,
            })?;
        if chunks.is_empty() {
            return Err(Error::Inconsistent {
                group,
                detail: format!("checkpoint chunk {next} is missing"),
            });
        }
        next += chunks.len() as u64;
        for c in chunks {
            data.extend_from_slice(&c);
        }
    }
    if data.len() as u64 != bytes {
        return Err(Error::Inconsistent {
            group,
            detail: format!(
                "checkpoint holds {} bytes, its pointer says {bytes}",
                data.len()
            ),
        });
    }
    Ok(data)
}

/// The applied log id and membership a checkpoint (or snapshot) records, decoded from
/// its header without decoding the state (backups check where a checkpoint stands).
pub fn checkpoint_header(bytes: &[u8]) -> Result<(Option<LogId>, StoredMembership), DecodeError> {
    let mut r = Reader::new("snapshot", bytes);
    let version = r.u8()?;
    if version != SNAPSHOT_VERSION {
        return Err(DecodeError::new(
            "snapshot",
            format!("version {version}, expected {SNAPSHOT_VERSION}"),
        ));
    }
    let last_applied = optional_log_id(&mut r)?;
    let membership_log_id = optional_log_id(&mut r)?;
    let membership = r.membership()?;
    Ok((
        last_applied,
        StoredMembership::new(membership_log_id, membership),
    ))
}

/// Writes `bytes` (a checkpoint as [`read_checkpoint`] returns it) as group `group`'s
/// checkpoint and waits until it is durable: the chunks first, then one batch that points
/// at them and purges older ones. Used by the state machine and by `chatlog restore`.
pub async fn write_checkpoint_bytes(
    engine: &Engine,
    group: GroupId,
    bytes: &[u8],
) -> Result<(), Error> {
    let log = ids::checkpoint_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let storage_err = |source| Error::Storage {
        group,
        verb: "writing",
        subject: "a checkpoint".into(),
        source,
    };
    let first = engine.bounds(log).map_or(1, |b| b.next.max(1));
    let chunk = CHECKPOINT_CHUNK_BYTES.min(engine.write_batch_bytes_max() / 4);
    let per_batch = (engine.write_batch_bytes_max() / 2 / chunk).max(1);
    let chunks: Vec<&[u8]> = bytes.chunks(chunk.max(1)).collect();
    let mut index = first;
    for group_of_chunks in chunks.chunks(per_batch) {
        let mut batch = WriteBatch::new();
        batch.append_many(log, index, group_of_chunks.iter().copied());
        engine.write(&batch).await.map_err(storage_err)?;
        index += group_of_chunks.len() as u64;
    }
    let mut batch = WriteBatch::new();
    batch.put_meta(
        log,
        ids::META_CHECKPOINT,
        &Pointer::Whole {
            first,
            count: chunks.len() as u64,
            bytes: bytes.len() as u64,
        }
        .encode(),
    );
    batch.purge_before(log, first);
    engine.write(&batch).await.map_err(storage_err)
}

/// Hands openraft the snapshot made when the builder was: the durable incremental
/// checkpoint at the applied index (written, or reused, by `get_snapshot_builder`), by
/// pointer. No encoding of the state is made or kept.
#[derive(Debug)]
pub struct ChatSnapshotBuilder {
    snapshot: Option<Result<Snapshot<SnapshotData>, Error>>,
}

impl RaftSnapshotBuilder<TypeConfig> for ChatSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot<SnapshotData>, io::Error> {
        // A checkpoint write that failed is a storage error: fatal for the group.
        match self.snapshot.take() {
            Some(Ok(snapshot)) => Ok(snapshot),
            Some(Err(e)) => Err(e.into()),
            None => Err(io::Error::other("the snapshot builder was used twice")),
        }
    }
}

impl RaftStateMachine<TypeConfig> for ChatStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = ChatSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((
            self.header.last_applied,
            self.header.last_membership.clone(),
        ))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Openraft streams one consecutive range per call: an entry missing inside it (a
        // log read that silently left one out) would make this replica's state diverge
        // (issue 9), so it stops the group instead.
        let mut previous: Option<LogId> = None;
        let mut applied = 0u64;
        let traced =
            chatlog_storage::timeline::replica_group(Arc::as_ptr(&self.engine).cast(), self.group);
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            if applied == 0 {
                chatlog_storage::timeline::record(
                    chatlog_storage::timeline::Event::ApplyStart,
                    traced,
                    entry.log_id.index,
                );
            }
            applied += 1;
            if let Some(p) = previous
                && entry.log_id.index != p.index + 1
            {
                return Err(Error::Inconsistent {
                    group: self.group,
                    detail: format!("apply of {} right after {p}: entries missing", entry.log_id),
                }
                .into());
            }
            previous = Some(entry.log_id);
            let reply = self.apply_entry(entry)?;
            // The feed first: whoever sees the new applied index finds it recorded.
            self.shared.feed().record(reply.log_index, &reply.outcomes);
            self.shared.applied.send_replace(reply.log_index);
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        chatlog_storage::timeline::record(
            chatlog_storage::timeline::Event::ApplyEnd,
            traced,
            applied,
        );
        if self.applied_since_checkpoint >= self.config.checkpoint_every_entries {
            chatlog_storage::timeline::record(
                chatlog_storage::timeline::Event::CheckpointStart,
                traced,
                applied,
            );
            self.checkpoint_in_background()?;
            chatlog_storage::timeline::record(
                chatlog_storage::timeline::Event::CheckpointEnd,
                traced,
                0,
            );
        } else {
            self.checkpointer.poll_finished()?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Openraft asks for a snapshot only when one is needed (the policy is `Never`: a
        // replica too far behind, retention's purge, or `trigger().snapshot()` from
        // `chatlog admin snapshot`). The snapshot is the durable checkpoint at the applied
        // index: reused if it is there, written (incrementally) if not.
        ChatSnapshotBuilder {
            snapshot: Some(self.checkpoint_for_snapshot().await),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let group = self.group;
        let (header, state, directory) = match &snapshot {
            // This replica's own checkpoint (openraft restoring a snapshot newer than the
            // applied state at start, which `get_current_snapshot` never offers): loaded
            // as a restart loads it, nothing written.
            SnapshotData::Local(local) if local.checkpoint.is_in(&self.engine, group) => {
                let pointer = local.checkpoint.pointer();
                let loaded = load_snapshot_checkpoint(&self.engine, group, pointer, meta)?;
                self.keeper.set_current(meta.clone(), pointer);
                loaded
            }
            // Another replica's, handed over in this process (openraft's conformance
            // suite): its checkpoint copied in as pieces, loaded, published; its range is
            // that replica's log and is not copied.
            SnapshotData::Local(local) => {
                let lock = Arc::clone(self.checkpointer.lock());
                let _writing = lock.lock().await;
                let engine = Arc::clone(&self.engine);
                let (loaded, pointer) = crate::snapshot_stream::install_copy(
                    &self.engine,
                    group,
                    &local.checkpoint,
                    &self.keeper,
                    |pointer| load_snapshot_checkpoint(&engine, group, pointer, meta),
                )
                .await?;
                self.shared
                    .set_checkpointed(meta.last_log_id.map_or(0, |l| l.index));
                self.keeper.set_current(meta.clone(), pointer);
                loaded
            }
            // The order of writes that makes the install crash-safe lives in
            // `snapshot_stream` (pieces, load, intent, pointer, range, clear).
            SnapshotData::Staged(staged) => {
                // After any background checkpoint in flight (`crate::checkpointer`): an
                // older state's checkpoint must not land after the installed one.
                let lock = Arc::clone(self.checkpointer.lock());
                let _writing = lock.lock().await;
                let engine = Arc::clone(&self.engine);
                let (loaded, pointer) = staged
                    .install(self.log.as_ref(), &self.keeper, |pointer| {
                        load_snapshot_checkpoint(&engine, group, pointer, meta)
                    })
                    .await?;
                self.shared
                    .set_checkpointed(meta.last_log_id.map_or(0, |l| l.index));
                self.keeper.set_current(meta.clone(), pointer);
                loaded
            }
        };
        *self.shared.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.header = header;
        self.applied_since_checkpoint = 0;
        // The installed checkpoint's chunks are this replica's now: the next checkpoint
        // writes only chunks completed after it.
        self.chunks = directory;
        let applied = meta.last_log_id.map_or(0, |l| l.index);
        // What the snapshot changed is unknown to the feed: readers rescan.
        self.shared.feed().reset(applied);
        self.shared.applied.send_replace(applied);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SnapshotData>>, io::Error> {
        // The durable incremental checkpoint, by pointer (the transport reads its pieces
        // and the range as it streams the snapshot, `snapshot_stream::send`). The newest
        // one, so a transfer that failed because a newer checkpoint purged its pieces is
        // retried with that one. Never one ahead of the applied state (a checkpoint a
        // damaged log's repair set aside, `repair::rebuild_state_from_log`).
        let applied = self.header.last_applied;
        Ok(self
            .keeper
            .current()
            .filter(|(meta, _)| meta.last_log_id <= applied)
            .map(|(meta, pointer)| self.local_snapshot(meta, pointer)))
    }
}

impl ChatStateMachine {
    /// The snapshot at the applied index: the durable checkpoint if it is there (after
    /// any background write), otherwise an incremental checkpoint written now.
    async fn checkpoint_for_snapshot(&mut self) -> Result<Snapshot<SnapshotData>, Error> {
        self.checkpointer.finish().await?;
        let meta = self.header.snapshot_meta();
        let pointer = match self.keeper.current() {
            Some((durable, pointer)) if durable == meta => pointer,
            _ => {
                let pointer = self.write_incremental().await?;
                self.applied_since_checkpoint = 0;
                pointer
            }
        };
        Ok(self.local_snapshot(meta, pointer))
    }

    /// A snapshot of this replica: its checkpoint `pointer` at `meta`, and the log.
    fn local_snapshot(&self, meta: SnapshotMeta, pointer: Pointer) -> Snapshot<SnapshotData> {
        let upto = meta.last_log_id.map_or(0, |l| l.index);
        Snapshot {
            meta,
            snapshot: SnapshotData::Local(crate::snapshot_stream::LocalSnapshot {
                checkpoint: CheckpointHandle::new(
                    Arc::clone(&self.engine),
                    self.group,
                    pointer,
                    Arc::clone(&self.keeper),
                ),
                log: self.log.clone(),
                upto,
            }),
        }
    }
}

#[cfg(test)]
#[path = "state_machine_retention_tests.rs"]
mod retention_tests;
