//! Reading one replica's events of a chat the way the history checker wants them (the
//! state's per-chat index, then each command from the Raft log, history below openraft's
//! purge mark included, as the node reads it), shared by the tests that
//! run replicas in one process (`power_cut.rs`, `sim.rs`).
//!
//! What it owns: the decoding of indexed events into `history::Event`. What it must not
//! do: decide anything; a missing entry or a batch that does not decode is a panic naming
//! node, group and index, a failed log read an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use chatlog_raft::LogReader;
use chatlog_raft::chat::Command;
use chatlog_raft::chat::command::DecodedBatch;
use chatlog_raft::state_machine::GroupShared;
use chatlog_raft::types::{EntryPayload, GroupId};

use crate::history::Event;

/// Every event of `chat` held by node `node_id`'s replica of `group` (through `reader` and
/// `shared`); a failed log read is returned as an error.
pub async fn replica_chat_events(
    node_id: u64,
    reader: &LogReader,
    shared: &Arc<GroupShared>,
    group: GroupId,
    chat: u64,
) -> Result<Vec<Event>, String> {
    let locs = shared
        .read()
        .chat_events(chat, 1, u64::MAX)
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut batches: BTreeMap<u64, DecodedBatch> = BTreeMap::new();
    for (seq, loc) in locs {
        let index = loc.raft_index();
        if let std::collections::btree_map::Entry::Vacant(slot) = batches.entry(index) {
            // As the node's chat reads do (`node.rs`): through `read_history`, which also
            // sees the committed entries kept below openraft's purge mark. A snapshot
            // (openraft's policy in `power_cut.rs`, or one installed from the leader)
            // purges the log logically, not physically; `try_get_log_entries` no longer
            // returns those entries, but the replica still holds them and must.
            let entries = reader
                .read_history(index, index + 1)
                .map_err(|e| format!("entry {index}: {e}"))?;
            let entry = entries.into_iter().next().unwrap_or_else(|| {
                panic!(
                    "node {} group {group}: event {seq} names entry {index}, which is missing",
                    node_id
                )
            });
            let EntryPayload::Normal(b) = entry.payload else {
                panic!(
                    "node {} group {group}: entry {index} holds no batch",
                    node_id
                );
            };
            slot.insert(DecodedBatch::parse(b.0).expect("a batch"));
        }
        let cmd = batches[&index].command(loc.pos()).expect("a command");
        out.push(match cmd {
            Command::Post {
                sender,
                client_message_id,
                text,
                ..
            } => Event {
                seq,
                sender,
                cmid: Some(client_message_id),
                text,
            },
            _ => Event {
                seq,
                sender: loc.sender,
                cmid: None,
                text: String::new(),
            },
        });
    }
    Ok(out)
}
