//! Runs the seed corpora of the `node_codec` and `chat_command` fuzz targets
//! (`fuzz/corpus/…`) through their checks (`fuzz/raft_check.rs`) on stable Rust, plus
//! every truncation of every seed: nothing may panic, and whatever decodes must
//! re-encode to a fixed point.
//!
//! The seeds are valid encodings made here from real requests, responses, entries,
//! commands and batches. After changing an encoding, regenerate them with
//! `CHATLOG_BLESS_CORPUS=1 cargo test -p chatlog-raft --test fuzz_corpus`. Files whose
//! names do not start with `seed-` are kept fuzzer findings and run too.

#[path = "../../fuzz/raft_check.rs"]
mod raft_check;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chatlog_raft::chat::{Batch, ChatKind, Command, Outcome, Refusal, RefusalCode};
use chatlog_raft::codec::encode_entry;
use chatlog_raft::network::codec::{self as nc, SnapshotChunk};
use chatlog_raft::node::ProposeError;
use chatlog_raft::types::{
    ChatBatch, Entry, EntryPayload, Membership, SnapshotMeta, StoredMembership, TypeConfig, Vote,
    log_id,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderError,
    TransferLeaderRequest, VoteRequest, VoteResponse,
};
use raft_check::{NODE_DECODERS, check_chat_command, check_node_codec};

fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn membership() -> Membership {
    let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    Membership::new_with_defaults(vec![voters], [4])
}

fn entries() -> Vec<Entry> {
    vec![
        Entry {
            log_id: log_id(1, 1, 0),
            payload: EntryPayload::Membership(membership()),
        },
        Entry {
            log_id: log_id(1, 1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(2, 3, 2),
            payload: EntryPayload::Normal(ChatBatch(batch())),
        },
    ]
}

fn commands() -> Vec<Command> {
    vec![
        Command::CreateChat {
            creator: 7,
            kind: ChatKind::Group,
            title: "friends".into(),
            members: vec![8, 9],
        },
        Command::Invite {
            chat: 65540,
            actor: 7,
            user: 10,
        },
        Command::Leave {
            chat: 65540,
            actor: 9,
        },
        Command::RevokeSession {
            user: 7,
            session_id: 3,
        },
    ]
}

fn batch() -> Bytes {
    Batch {
        timestamp_ms: 1_767_225_600_000,
        commands: commands(),
    }
    .encode()
}

fn with_selector(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![selector];
    v.extend_from_slice(bytes);
    v
}

/// (name, input) of every node-codec seed.
fn node_seeds() -> Vec<(String, Vec<u8>)> {
    let vote = Vote::new_committed(2, 3);
    let sel = |name: &str| NODE_DECODERS.iter().position(|n| *n == name).unwrap() as u8;
    let mut out: Vec<(&str, Vec<u8>)> = Vec::new();
    let aer = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(log_id(1, 1, 0)),
        entries: entries(),
        leader_commit: Some(log_id(1, 1, 1)),
    };
    out.push((
        "append-entries-request",
        with_selector(
            sel("append-entries request"),
            &nc::encode_append_entries_request(&aer),
        ),
    ));
    for (name, resp) in [
        (
            "append-entries-response-success",
            AppendEntriesResponse::<TypeConfig>::Success,
        ),
        (
            "append-entries-response-partial",
            AppendEntriesResponse::PartialSuccess(Some(log_id(2, 3, 9))),
        ),
        (
            "append-entries-response-conflict",
            AppendEntriesResponse::Conflict,
        ),
        (
            "append-entries-response-higher-vote",
            AppendEntriesResponse::HigherVote(Vote::new(5, 2)),
        ),
    ] {
        out.push((
            name,
            with_selector(
                sel("append-entries response"),
                &nc::encode_append_entries_response(&resp),
            ),
        ));
    }
    let vr = VoteRequest::<TypeConfig> {
        vote: Vote::new(3, 1),
        last_log_id: Some(log_id(2, 3, 9)),
        leadership_transfer: false,
    };
    out.push((
        "vote-request",
        with_selector(sel("vote request"), &nc::encode_vote_request(&vr)),
    ));
    let vresp = VoteResponse::<TypeConfig> {
        vote,
        vote_granted: true,
        last_log_id: None,
    };
    out.push((
        "vote-response",
        with_selector(sel("vote response"), &nc::encode_vote_response(&vresp)),
    ));
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(2, 3, 9)),
        last_membership: StoredMembership::new(Some(log_id(1, 1, 0)), membership()),
    };
    let first = SnapshotChunk {
        vote,
        meta: Some(meta),
        offset: 0,
        data: Bytes::from_static(b"snapshot bytes"),
        done: false,
    };
    out.push((
        "snapshot-chunk-first",
        with_selector(sel("snapshot chunk"), &nc::encode_snapshot_chunk(&first)),
    ));
    let last = SnapshotChunk {
        vote,
        meta: None,
        offset: 14,
        data: Bytes::from_static(b"end"),
        done: true,
    };
    out.push((
        "snapshot-chunk-last",
        with_selector(sel("snapshot chunk"), &nc::encode_snapshot_chunk(&last)),
    ));
    out.push((
        "snapshot-response",
        with_selector(
            sel("snapshot response"),
            &nc::encode_snapshot_response(&SnapshotResponse::new(vote)),
        ),
    ));
    let tl = TransferLeaderRequest::<TypeConfig>::new(vote, 2, Some(log_id(2, 3, 9)));
    out.push((
        "transfer-leader-request",
        with_selector(
            sel("transfer-leader request"),
            &nc::encode_transfer_leader_request(&tl),
        ),
    ));
    let accepted: Result<(), TransferLeaderError<TypeConfig>> = Ok(());
    out.push((
        "transfer-leader-accepted",
        with_selector(
            sel("transfer-leader response"),
            &nc::encode_transfer_leader_response(&accepted),
        ),
    ));
    let changed: Result<(), TransferLeaderError<TypeConfig>> =
        Err(TransferLeaderError::VoteChanged {
            expected: vote,
            actual: Vote::new(4, 1),
        });
    out.push((
        "transfer-leader-vote-changed",
        with_selector(
            sel("transfer-leader response"),
            &nc::encode_transfer_leader_response(&changed),
        ),
    ));
    out.push((
        "propose-request",
        with_selector(
            sel("propose request"),
            &nc::encode_propose_request(&commands()),
        ),
    ));
    let results: Vec<nc::ProposeResult> = vec![
        Ok(Outcome::Event {
            chat: 65540,
            seq: 12,
            timestamp_ms: 1_767_225_600_000,
            deduplicated: false,
        }),
        Ok(Outcome::UserCreated { user: 7 }),
        Ok(Outcome::Refused(Refusal {
            code: RefusalCode::BadRequest,
            message: "no such chat".into(),
        })),
        Err(ProposeError::NotLeader {
            group: 4,
            leader: Some(2),
        }),
        Err(ProposeError::Unknown {
            group: 4,
            detail: "leader changed".into(),
        }),
    ];
    out.push((
        "propose-response",
        with_selector(
            sel("propose response"),
            &nc::encode_propose_response(9, &results),
        ),
    ));
    out.push((
        "read-index-request",
        with_selector(sel("read-index request"), &nc::encode_read_index_request()),
    ));
    out.push((
        "read-index-response",
        with_selector(
            sel("read-index response"),
            &nc::encode_read_index_response(&Ok(42)),
        ),
    ));
    for (i, e) in entries().iter().enumerate() {
        out.push((
            ["entry-membership", "entry-blank", "entry-normal"][i],
            with_selector(sel("entry"), &encode_entry(e)),
        ));
    }
    out.into_iter()
        .map(|(n, v)| (format!("seed-{n}"), v))
        .collect()
}

/// (name, input) of every chat-command seed.
fn chat_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, c) in commands().iter().enumerate() {
        let mut v = vec![0u8];
        c.encode_into(&mut v);
        out.push((format!("seed-command-{i}"), v));
    }
    out.push(("seed-batch".into(), with_selector(1, &batch())));
    out.push((
        "seed-batch-empty".into(),
        with_selector(
            1,
            &Batch {
                timestamp_ms: 5,
                commands: vec![],
            }
            .encode(),
        ),
    ));
    out
}

fn bless_or_compare(target: &str, seeds: &[(String, Vec<u8>)]) {
    let bless = std::env::var_os("CHATLOG_BLESS_CORPUS").is_some();
    let d = dir(target);
    for (name, bytes) in seeds {
        let path = d.join(name);
        if bless {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(&path, bytes).unwrap();
            continue;
        }
        assert!(
            std::fs::read(&path).unwrap_or_default() == *bytes,
            "{} is out of date; regenerate with \
             CHATLOG_BLESS_CORPUS=1 cargo test -p chatlog-raft --test fuzz_corpus",
            path.display()
        );
    }
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir(target))
        .expect("the corpus directory exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn node_codec_seeds_are_up_to_date() {
    bless_or_compare("node_codec", &node_seeds());
}

#[test]
fn chat_command_seeds_are_up_to_date() {
    bless_or_compare("chat_command", &chat_seeds());
}

#[test]
fn node_codec_corpus_and_its_truncations_pass() {
    let files = corpus("node_codec");
    assert!(files.len() >= node_seeds().len(), "the corpus lost files");
    let (mut decoded, mut inputs) = (0, 0);
    for (name, data) in &files {
        if name.starts_with("seed-") {
            assert!(check_node_codec(data), "{name}: a seed does not decode");
        }
        for len in 0..=data.len() {
            inputs += 1;
            let ok = check_node_codec(&data[..len]);
            decoded += ok as usize;
            // Every message encoding is exact: a strict prefix of a seed never decodes.
            // (An entry's normal payload runs to the end of its bytes, so any cut after
            // its header is another valid entry.)
            if name.starts_with("seed-")
                && !name.starts_with("seed-entry")
                && len < data.len()
                && len > 0
            {
                assert!(!ok, "{name}: its {len}-byte prefix decoded");
            }
        }
    }
    eprintln!("node codec: {inputs} inputs, {decoded} decoded");
}

#[test]
fn chat_command_corpus_and_its_truncations_pass() {
    let files = corpus("chat_command");
    assert!(files.len() >= chat_seeds().len(), "the corpus lost files");
    let (mut commands, mut inputs) = (0, 0);
    for (name, data) in &files {
        if name.starts_with("seed-") && name != "seed-batch-empty" {
            assert!(
                check_chat_command(data) > 0,
                "{name}: a seed does not decode"
            );
        }
        for len in 0..=data.len() {
            inputs += 1;
            commands += check_chat_command(&data[..len]);
        }
    }
    eprintln!("chat commands: {inputs} inputs, {commands} commands decoded");
}
