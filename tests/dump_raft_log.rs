//! Offline dump of one group's Raft log from a (stopped) node's data directory, for
//! post-mortems of chaos runs kept with `CHATLOG_TEST_KEEP_DIR` (tests/common/cluster.rs):
//! one line per entry with its log id, payload digest (`codec::payload_digest`, the same
//! digest the state machine logs at apply) and, for posts, who sent what. Compare two
//! replicas' dumps with `diff` to see whether the LOGS differ or only the applied states.
//!
//! ```text
//! CHATLOG_DUMP_DIR=/keep/cluster-XXXX/node-1 CHATLOG_DUMP_GROUP=4 \
//!   cargo test -p chatlog --test dump_raft_log -- --ignored --nocapture
//! ```
//!
//! Ignored by default: it needs a data directory to read.

use std::sync::Arc;

use chatlog_raft::chat::{Command, DecodedBatch};
use chatlog_raft::codec::payload_digest;
use chatlog_raft::log_store::LogStore;
use chatlog_raft::types::EntryPayload;
use openraft::storage::{RaftLogReader, RaftLogStorage};

#[tokio::test]
#[ignore = "post-mortem tool: needs CHATLOG_DUMP_DIR and CHATLOG_DUMP_GROUP"]
async fn dump_raft_log() {
    let dir = std::env::var("CHATLOG_DUMP_DIR").expect("CHATLOG_DUMP_DIR: a node's data dir");
    let group: u64 = std::env::var("CHATLOG_DUMP_GROUP")
        .expect("CHATLOG_DUMP_GROUP")
        .parse()
        .expect("a group id");
    let engine = Arc::new(
        chatlog_storage::Engine::open(chatlog_storage::Config::new(&dir)).expect("engine"),
    );
    let mut store = LogStore::open(Arc::clone(&engine), group).expect("log store");
    let state = store.get_log_state().await.expect("log state");
    let vote = store
        .get_log_reader()
        .await
        .read_vote()
        .await
        .expect("vote");
    let committed = store.read_committed().await.expect("committed");
    println!("group {group}: vote {vote:?} committed {committed:?} state {state:?}");
    let mut reader = store.get_log_reader().await;
    let entries = reader
        .try_get_log_entries(0..u64::MAX)
        .await
        .expect("entries");
    for e in entries {
        let digest = payload_digest(&e);
        let what = match &e.payload {
            EntryPayload::Blank => "blank".to_string(),
            EntryPayload::Membership(m) => format!("membership {m:?}"),
            EntryPayload::Normal(b) => match DecodedBatch::parse(b.0.clone()) {
                Err(err) => format!("undecodable batch: {err}"),
                Ok(batch) => {
                    let mut parts = vec![format!("ts {}", batch.timestamp_ms)];
                    for pos in 0..batch.len() {
                        parts.push(match batch.command(pos) {
                            Ok(Command::Post {
                                chat,
                                sender,
                                client_message_id,
                                text,
                                ..
                            }) => format!("post {chat}/{sender}/{client_message_id} {text:?}"),
                            Ok(other) => {
                                // The variant and its first fields are enough to tell
                                // entries apart.
                                let d = format!("{other:?}");
                                d.chars().take(60).collect()
                            }
                            Err(err) => format!("bad command: {err}"),
                        });
                    }
                    parts.join(" | ")
                }
            },
        };
        println!(
            "{} t{}n{} {digest:016x} {what}",
            e.log_id.index, e.log_id.leader_id.term, e.log_id.leader_id.node_id
        );
    }
}
