//! A group's state machine: openraft's `RaftStateMachine` and `RaftSnapshotBuilder`.
//!
//! What it owns today: the applied state openraft needs (last applied log id, last
//! membership) plus a count of applied chat batches, and snapshots of exactly that
//! state. What it must not do: block on I/O in `apply`, or reorder entries.
//!
//! Deliberately small, and **in memory only**: after a restart `applied_state` reports
//! nothing and openraft re-applies the log from the start (`(applied, committed]`), which
//! works only while nothing below the committed mark was purged. The chat semantics (seq
//! assignment, membership and role checks, de-duplication, the per-chat index) and
//! checkpoints through the engine's metadata replace this in the next slices; the trait
//! plumbing and the snapshot format here stay.
//!
//! Snapshot bytes (`SnapshotData`), little-endian:
//!
//! ```text
//! 0 version u8 (= SNAPSHOT_VERSION)
//! 1 has_applied u8 (0/1) [| applied LogId, 24 bytes]
//!   has_membership_log_id u8 (0/1) [| membership LogId, 24 bytes]
//!   Membership (codec)
//!   batches_applied u64 | batch_bytes_applied u64
//! ```

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use openraft::OptionalSend;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};

use crate::codec::{self, DecodeError, Reader};
use crate::error::Error;
use crate::types::{
    ChatBatchReply, Entry, EntryPayload, GroupId, LogId, Snapshot, SnapshotMeta, StoredMembership,
    TypeConfig,
};

/// The bytes of a snapshot (see the module docs for the format).
pub type SnapshotData = Bytes;

/// Version byte of the snapshot format.
pub const SNAPSHOT_VERSION: u8 = 1;

/// What applying the log so far has produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// The last applied entry.
    pub last_applied: Option<LogId>,
    /// The last membership applied, with the id of its entry.
    pub last_membership: StoredMembership,
    /// Normal (chat batch) entries applied.
    pub batches_applied: u64,
    /// Payload bytes of those entries.
    pub batch_bytes_applied: u64,
}

impl AppliedState {
    /// Encodes the state as snapshot bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = vec![SNAPSHOT_VERSION];
        put_optional_log_id(&mut out, self.last_applied.as_ref());
        put_optional_log_id(&mut out, self.last_membership.log_id().as_ref());
        codec::put_membership(&mut out, self.last_membership.membership());
        out.extend_from_slice(&self.batches_applied.to_le_bytes());
        out.extend_from_slice(&self.batch_bytes_applied.to_le_bytes());
        Bytes::from(out)
    }

    /// Decodes snapshot bytes made by [`AppliedState::encode`].
    pub fn decode(bytes: &[u8]) -> Result<AppliedState, DecodeError> {
        let mut r = Reader::new("snapshot", bytes);
        let version = r.u8()?;
        if version != SNAPSHOT_VERSION {
            return Err(DecodeError {
                what: "snapshot",
                detail: format!("version {version}, expected {SNAPSHOT_VERSION}"),
            });
        }
        let last_applied = optional_log_id(&mut r)?;
        let membership_log_id = optional_log_id(&mut r)?;
        let membership = r.membership()?;
        let batches_applied = r.u64()?;
        let batch_bytes_applied = r.u64()?;
        r.finish()?;
        Ok(AppliedState {
            last_applied,
            last_membership: StoredMembership::new(membership_log_id, membership),
            batches_applied,
            batch_bytes_applied,
        })
    }

    /// Applies one entry; entries must come in strictly increasing index order.
    fn apply(&mut self, group: GroupId, entry: Entry) -> Result<ChatBatchReply, Error> {
        if let Some(applied) = self.last_applied
            && entry.log_id.index <= applied.index
        {
            return Err(Error::Inconsistent {
                group,
                detail: format!("apply of {} after {applied}", entry.log_id),
            });
        }
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(batch) => {
                self.batches_applied += 1;
                self.batch_bytes_applied += batch.0.len() as u64;
            }
            EntryPayload::Membership(m) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), m);
            }
        }
        self.last_applied = Some(entry.log_id);
        Ok(ChatBatchReply {
            log_index: entry.log_id.index,
        })
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

/// The latest snapshot, shared between a state machine and its builders.
type CurrentSnapshot = Arc<Mutex<Option<Snapshot<SnapshotData>>>>;

fn lock(current: &CurrentSnapshot) -> MutexGuard<'_, Option<Snapshot<SnapshotData>>> {
    // Held only to swap or clone a value; poisoning would mean a bug already stopped us.
    current.lock().expect("snapshot lock")
}

/// The state machine of one group.
#[derive(Debug)]
pub struct ChatStateMachine {
    group: GroupId,
    applied: AppliedState,
    current_snapshot: CurrentSnapshot,
}

impl ChatStateMachine {
    /// A state machine with nothing applied.
    pub fn new(group: GroupId) -> ChatStateMachine {
        ChatStateMachine {
            group,
            applied: AppliedState::default(),
            current_snapshot: CurrentSnapshot::default(),
        }
    }

    /// The state applied so far.
    pub fn applied(&self) -> &AppliedState {
        &self.applied
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
#[derive(Debug)]
pub struct ChatSnapshotBuilder {
    applied: AppliedState,
    current_snapshot: CurrentSnapshot,
}

impl RaftSnapshotBuilder<TypeConfig> for ChatSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot<SnapshotData>, io::Error> {
        let snapshot = Snapshot {
            meta: self.applied.snapshot_meta(),
            snapshot: self.applied.encode(),
        };
        *lock(&self.current_snapshot) = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for ChatStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = ChatSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((
            self.applied.last_applied,
            self.applied.last_membership.clone(),
        ))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let reply = self.applied.apply(self.group, entry)?;
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        ChatSnapshotBuilder {
            applied: self.applied.clone(),
            current_snapshot: Arc::clone(&self.current_snapshot),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let state = AppliedState::decode(&snapshot).map_err(|source| Error::Decode {
            group: self.group,
            subject: format!("the snapshot at {:?}", meta.last_log_id),
            source,
        })?;
        if state.snapshot_meta() != *meta {
            return Err(Error::Inconsistent {
                group: self.group,
                detail: format!(
                    "snapshot data says {:?} / {:?}, its meta says {meta}",
                    state.last_applied, state.last_membership
                ),
            }
            .into());
        }
        self.applied = state;
        *lock(&self.current_snapshot) = Some(Snapshot {
            meta: meta.clone(),
            snapshot,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SnapshotData>>, io::Error> {
        Ok(lock(&self.current_snapshot).clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::types::{ChatBatch, Membership, log_id};

    #[test]
    fn snapshot_bytes_round_trip() {
        let mut state = AppliedState::default();
        assert_eq!(AppliedState::decode(&state.encode()), Ok(state.clone()));
        let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
        state
            .apply(
                0,
                Entry {
                    log_id: log_id(1, 1, 0),
                    payload: EntryPayload::Membership(Membership::new_with_defaults(
                        vec![voters],
                        [7],
                    )),
                },
            )
            .expect("applies");
        state
            .apply(
                0,
                Entry {
                    log_id: log_id(1, 1, 1),
                    payload: EntryPayload::Normal(ChatBatch(Bytes::from_static(b"abc"))),
                },
            )
            .expect("applies");
        assert_eq!(state.batches_applied, 1);
        assert_eq!(state.batch_bytes_applied, 3);
        let bytes = state.encode();
        assert_eq!(AppliedState::decode(&bytes), Ok(state.clone()));
        for len in 0..bytes.len() {
            assert!(AppliedState::decode(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn apply_refuses_entries_out_of_order() {
        let mut state = AppliedState::default();
        let blank = |index| Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Blank,
        };
        state.apply(0, blank(5)).expect("applies");
        assert!(state.apply(0, blank(5)).is_err());
        assert!(state.apply(0, blank(4)).is_err());
        assert!(state.apply(0, blank(6)).is_ok());
    }
}
