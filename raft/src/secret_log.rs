//! The I/O side of secret chats on one replica, and of deleted messages: reading a
//! pending message's ciphertext out of the Raft log, and erasing message bytes from disk
//! once the state says they are gone.
//!
//! What it owns: the eraser task of each local group. It follows the group's applied
//! index; for every erasure the state recorded (`chat::secret`: acknowledged or expired
//! secret messages, and the text of a deleted post and of each of its edits) it reads
//! the Raft entry that holds the command, overwrites the ciphertext or text bytes with
//! zeros at the same length (so every position in the entry stays valid and the entry
//! still decodes), and writes that copy with the engine's `redact`.
//! The original bytes leave the disk when compaction rewrites their segment (the engine
//! compacts any sealed segment holding a redacted entry; `POST /admin/compact` forces
//! it). What it must not do: change the state (it runs beside apply, on every replica,
//! and only touches bytes no rule reads), or block apply.
//!
//! Determinism. What is erased and when is decided by apply, identically on every
//! replica; only the disk write is local. A lagging follower may receive an entry whose
//! ciphertext the leader already zeroed: it applies the `send` exactly as the leader did
//! (the rules never look at ciphertext bytes, nor at a text's bytes beyond its length),
//! then applies the ack, expiry or delete that follows in the log, and both replicas
//! end in the same state. Readers treat a
//! ciphertext of all zeros as erased ([`ciphertext_is_erased`]): such a message is never
//! delivered.
//!
//! Crash safety. The state keeps the recent erasures (`SECRET_ERASURES_KEPT_*`); an
//! eraser starting up redoes all of them, skipping entries already zeroed or purged, so
//! a crash between apply and the redact's fdatasync loses no erasure.
//!
//! Retention (`crate::retention`) never purges an entry that holds a pending secret
//! message (it would be lost unread), nor one holding an erasure this replica's eraser
//! has not zeroed yet (a recycled file keeps its old bytes; the engine deletes, never
//! recycles, segments that held redacted bytes). Pending messages are read with
//! `LogReader::read_history`, which also sees entries below openraft's purge mark.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chatlog_storage::{Engine, WriteBatch};

use crate::chat::command::message_text_span;
use crate::chat::secret::{Erasure, SecretCommand, send_ciphertext_span};
use crate::chat::{Command, DecodedBatch};
use crate::codec::{self, ENTRY_HEADER_BYTES};
use crate::error::Error;
use crate::ids;
use crate::log_store::LogReader;
use crate::state_machine::GroupShared;
use crate::types::{EntryPayload, GroupId};

/// How long an eraser waits for an entry to become durable locally before giving up on
/// it. Why: an entry is applied once a majority holds it, possibly before this replica's
/// own fdatasync; that sync follows within a group commit, milliseconds. Ten seconds
/// covers a stalled disk without retrying forever (a give-up is logged; the state keeps
/// the erasure and the next restart retries it).
pub const ERASE_DURABLE_WAIT_MAX: Duration = Duration::from_secs(10);

/// Pause between two looks at an entry that is not durable yet.
const ERASE_RETRY_PAUSE: Duration = Duration::from_millis(5);

/// True when the ciphertext was zeroed by an eraser (a real ciphertext ends with a
/// 16-byte authentication tag; all zeros there has probability 2^-128).
pub fn ciphertext_is_erased(ciphertext: &[u8]) -> bool {
    ciphertext.iter().all(|b| *b == 0)
}

/// A pending message read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// The sending device.
    pub sender_device: String,
    /// The ciphertext (never all zeros: an erased one is not returned).
    pub ciphertext: Vec<u8>,
}

/// Reads the `send` at `(raft_index, pos)` through the group's log reader. `Ok(None)`
/// when its ciphertext was already erased or the entry no longer holds a `send` there.
pub async fn read_send(
    group: GroupId,
    reader: &LogReader,
    raft_index: u64,
    pos: u32,
) -> Result<Option<SentMessage>, Error> {
    // History reads: a pending message may sit below openraft's purge mark.
    let entries = reader
        .read_history(raft_index, raft_index + 1)
        .map_err(|e| Error::Inconsistent {
            group,
            detail: format!("reading log entry {raft_index} for a secret message: {e}"),
        })?;
    let Some(entry) = entries.into_iter().next() else {
        return Ok(None);
    };
    let EntryPayload::Normal(batch) = entry.payload else {
        return Ok(None);
    };
    let batch = DecodedBatch::parse(batch.0).map_err(|source| Error::Decode {
        group,
        subject: format!("the batch in log entry {raft_index}"),
        source,
    })?;
    match batch.command(pos as usize) {
        Ok(Command::Secret(SecretCommand::Send {
            sender_device,
            ciphertext,
            ..
        })) if !ciphertext_is_erased(&ciphertext) => Ok(Some(SentMessage {
            sender_device,
            ciphertext,
        })),
        _ => Ok(None),
    }
}

/// What one erasure did on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EraseResult {
    /// The ciphertext was zeroed and the copy is durable.
    Zeroed,
    /// Nothing to do: already zeroed, or the entry was purged from the log.
    AlreadyGone,
}

/// Zeroes the message bytes of the command at `(raft_index, pos)` of group `group` in
/// `engine` — a secret `send`'s ciphertext, or a deleted post's or edit's text —
/// waiting up to [`ERASE_DURABLE_WAIT_MAX`] for the entry to be durable.
pub async fn erase_send(
    engine: &Engine,
    group: GroupId,
    raft_index: u64,
    pos: u32,
) -> Result<EraseResult, Error> {
    let log = ids::raft_log(group).ok_or(Error::GroupIdTooLarge {
        group,
        max: ids::GROUP_ID_MAX,
    })?;
    let index = ids::engine_index(raft_index);
    let storage_err = |verb: &'static str, source| Error::Storage {
        group,
        verb,
        subject: format!("the message bytes in log entry {raft_index}"),
        source,
    };
    let started = tokio::time::Instant::now();
    let bytes = loop {
        let Some(bounds) = engine.bounds(log) else {
            return Ok(EraseResult::AlreadyGone);
        };
        if index < bounds.first {
            return Ok(EraseResult::AlreadyGone);
        }
        if index < bounds.next {
            break engine
                .get(log, index)
                .map_err(|e| storage_err("reading", e))?;
        }
        if started.elapsed() > ERASE_DURABLE_WAIT_MAX {
            return Err(Error::Inconsistent {
                group,
                detail: format!(
                    "log entry {raft_index} was not durable after {ERASE_DURABLE_WAIT_MAX:?}"
                ),
            });
        }
        tokio::time::sleep(ERASE_RETRY_PAUSE).await;
    };
    let entry = codec::decode_entry(&bytes).map_err(|source| Error::Decode {
        group,
        subject: format!("log entry {raft_index}"),
        source,
    })?;
    let EntryPayload::Normal(batch) = entry.payload else {
        return Ok(EraseResult::AlreadyGone);
    };
    let batch = DecodedBatch::parse(batch.0).map_err(|source| Error::Decode {
        group,
        subject: format!("the batch in log entry {raft_index}"),
        source,
    })?;
    let (Some(command), Some(offset)) = (
        batch.command_bytes(pos as usize),
        batch.command_offset(pos as usize),
    ) else {
        return Ok(EraseResult::AlreadyGone);
    };
    let Some((at, len)) = send_ciphertext_span(command).or_else(|| message_text_span(command))
    else {
        return Ok(EraseResult::AlreadyGone);
    };
    let start = ENTRY_HEADER_BYTES + offset + at;
    if ciphertext_is_erased(&bytes[start..start + len]) {
        return Ok(EraseResult::AlreadyGone);
    }
    let mut zeroed = bytes.to_vec();
    zeroed[start..start + len].fill(0);
    let mut write = WriteBatch::new();
    write.redact(log, index, &zeroed);
    match engine.write(&write).await {
        Ok(()) => Ok(EraseResult::Zeroed),
        // Purged between the look and the write: the entry is gone anyway.
        Err(chatlog_storage::Error::InvalidWrite { .. }) => Ok(EraseResult::AlreadyGone),
        Err(e) => Err(storage_err("redacting", e)),
    }
}

/// The eraser of one local group (see the module docs). `done` is the number of the last
/// erasure handled, for `Node::secret_erasures_settled`.
pub async fn run_eraser(
    group: GroupId,
    engine: Arc<Engine>,
    shared: Arc<GroupShared>,
    done: Arc<AtomicU64>,
) {
    let mut applied = shared.applied();
    // 0: redo every erasure the state still remembers (see "Crash safety").
    let mut cursor = 0;
    loop {
        let (due, total) = shared.read().secret().erasures_after(cursor);
        for Erasure {
            no,
            raft_index,
            pos,
            ..
        } in due
        {
            match erase_send(&engine, group, raft_index, pos).await {
                Ok(_) => {}
                Err(e) => tracing::error!(
                    group,
                    raft_index,
                    error = %e,
                    "could not erase a secret message from disk"
                ),
            }
            cursor = no;
        }
        if total > cursor {
            // Forgotten by the state before this eraser saw them (more than
            // SECRET_ERASURES_KEPT_MAX in one wake-up): say so, never silently.
            tracing::error!(
                group,
                missed = total - cursor,
                "secret erasures were dropped before this replica's eraser handled them"
            );
            cursor = total;
        }
        done.store(cursor, Ordering::Release);
        if applied.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::secret::SecretApplied;
    use crate::chat::{Batch, GroupState, Outcome};
    use crate::types::{ChatBatch, Entry, log_id};

    const G: GroupId = 1;

    fn batch(ts: u64, commands: Vec<SecretCommand>) -> Batch {
        Batch {
            timestamp_ms: ts,
            commands: commands.into_iter().map(Command::Secret).collect(),
        }
    }

    /// Applies a batch the way the state machine does (parse, decode each command).
    fn apply(st: &mut GroupState, bytes: bytes::Bytes, index: u64) -> Vec<Outcome> {
        let b = DecodedBatch::parse(bytes).expect("parses");
        (0..b.len())
            .map(|pos| {
                st.apply(
                    &b.command(pos).expect("decodes"),
                    b.timestamp_ms,
                    index,
                    pos,
                )
            })
            .collect()
    }

    fn setup() -> (Vec<SecretCommand>, SecretCommand) {
        let start = SecretCommand::Start {
            initiator: 1 << 16 | G,
            initiator_device: "phone".into(),
            initiator_key: [1; 32],
            ephemeral_key: [2; 32],
            responder: 2 << 16 | G,
            responder_device: "laptop".into(),
            responder_key: [3; 32],
        };
        let chat = crate::chat::make_id(G, 1);
        let send = |counter| SecretCommand::Send {
            chat,
            sender: 1 << 16 | G,
            sender_device: "phone".into(),
            counter,
            epoch: 0,
            ttl_ms: 60_000,
            self_destruct_s: 0,
            ciphertext: vec![0x5a; 48],
        };
        let ack = SecretCommand::Ack {
            chat,
            user: 2 << 16 | G,
            device: "laptop".into(),
            counter: 2,
        };
        (vec![start, send(1), send(2)], ack)
    }

    #[tokio::test]
    async fn erasing_zeroes_the_ciphertext_and_a_lagging_replica_converges() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = chatlog_storage::Config::new(dir.path());
        config.segment_bytes = 256 << 10;
        let engine = Engine::open(config).unwrap();
        let (first, ack) = setup();
        let entry = Entry {
            log_id: log_id(1, 1, 7),
            payload: EntryPayload::Normal(ChatBatch(batch(1_000, first).encode())),
        };
        let log = ids::raft_log(G).unwrap();
        let mut w = WriteBatch::new();
        // The log starts at Raft index 7 (engine index 8).
        w.purge_before(log, ids::engine_index(7));
        w.append(log, ids::engine_index(7), &codec::encode_entry(&entry));
        engine.write(&w).await.unwrap();

        // The leader applies the entry, then the ack, which erases both messages.
        let mut leader = GroupState::new(G);
        let original = engine.get(log, ids::engine_index(7)).unwrap();
        let EntryPayload::Normal(b) = codec::decode_entry(&original).unwrap().payload else {
            panic!("normal entry")
        };
        apply(&mut leader, b.0, 7);
        assert_eq!(leader.secret().pending_count(), 2);
        let ack_batch = batch(2_000, vec![ack]).encode();
        let out = apply(&mut leader, ack_batch.clone(), 8);
        assert!(matches!(
            out[0],
            Outcome::Secret(SecretApplied { n: 2, .. })
        ));
        let (erasures, _) = leader.secret().erasures_after(0);
        for e in &erasures {
            assert_eq!(
                erase_send(&engine, G, e.raft_index, e.pos).await.unwrap(),
                EraseResult::Zeroed
            );
        }
        // Idempotent: a restarted eraser finds nothing left to do.
        for e in &erasures {
            assert_eq!(
                erase_send(&engine, G, e.raft_index, e.pos).await.unwrap(),
                EraseResult::AlreadyGone
            );
        }
        // The stored entry keeps its length and header and still decodes; only the
        // ciphertext bytes changed, to zeros.
        let zeroed = engine.get(log, ids::engine_index(7)).unwrap();
        assert_eq!(zeroed.len(), original.len());
        let changed: Vec<usize> = (0..zeroed.len())
            .filter(|i| zeroed[*i] != original[*i])
            .collect();
        assert_eq!(changed.len(), 2 * 48);
        assert!(
            changed
                .iter()
                .all(|i| zeroed[*i] == 0 && original[*i] == 0x5a)
        );
        let decoded = codec::decode_entry(&zeroed).unwrap();
        assert_eq!(decoded.log_id, entry.log_id);
        let EntryPayload::Normal(b) = decoded.payload else {
            panic!("normal entry")
        };

        // A lagging follower receives the zeroed entry, then the ack: same state.
        let mut follower = GroupState::new(G);
        apply(&mut follower, b.0.clone(), 7);
        assert_eq!(
            follower.secret().pending_count(),
            2,
            "same rules, zeroed bytes"
        );
        apply(&mut follower, ack_batch, 8);
        assert_eq!(follower.encode(), leader.encode());

        // Readers never hand out a zeroed ciphertext.
        let parsed = DecodedBatch::parse(b.0).unwrap();
        match parsed.command(1).unwrap() {
            Command::Secret(SecretCommand::Send { ciphertext, .. }) => {
                assert!(ciphertext_is_erased(&ciphertext));
            }
            other => panic!("{other:?}"),
        }
        // An entry purged from the log is already gone.
        let mut w = WriteBatch::new();
        w.purge_before(log, ids::engine_index(8));
        engine.write(&w).await.unwrap();
        assert_eq!(
            erase_send(&engine, G, 7, 1).await.unwrap(),
            EraseResult::AlreadyGone
        );
    }
}
