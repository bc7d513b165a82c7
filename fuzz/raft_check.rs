//! The checks behind the `node_codec` and `chat_command` fuzz targets, shared with
//! `raft/tests/fuzz_corpus.rs`, which runs their corpora on stable Rust.
//!
//! Both take arbitrary bytes from the network or the log and must never panic. Whatever
//! decodes must reach a fixed point: encoded again it decodes again and encodes to the
//! same bytes (the node codec's encodings are canonical, so the first re-encoding is
//! the input itself).
//!
//! `node_codec` inputs: the first byte picks the decoder (see [`NODE_DECODERS`]), the rest
//! is its input. `chat_command` inputs: the first byte picks a command (even) or a batch
//! (odd), the rest is its input.

use bytes::Bytes;
use chatlog_raft::chat::Command;
use chatlog_raft::chat::command::DecodedBatch;
use chatlog_raft::codec::{decode_entry, encode_entry};
use chatlog_raft::network::codec as nc;

/// Group id handed to the decoders that name the group in their errors.
const GROUP: u64 = 4;

/// The node-to-node decoders, by the selector byte (modulo their count).
pub const NODE_DECODERS: [&str; 13] = [
    "append-entries request",
    "append-entries response",
    "vote request",
    "vote response",
    "snapshot chunk",
    "snapshot response",
    "transfer-leader request",
    "transfer-leader response",
    "propose request",
    "propose response",
    "read-index request",
    "read-index response",
    "entry",
];

fn fixed_point(what: &str, input: &[u8], again: Bytes, decode_again: impl Fn(&Bytes) -> Bytes) {
    assert_eq!(
        &again[..],
        input,
        "{what}: re-encoding differs from the input"
    );
    assert_eq!(
        decode_again(&again),
        again,
        "{what}: re-encoding is not stable"
    );
}

/// Decodes `data[1..]` with the decoder `data[0]` names; returns whether it decoded.
pub fn check_node_codec(data: &[u8]) -> bool {
    let Some((&selector, input)) = data.split_first() else {
        return false;
    };
    let bytes = Bytes::copy_from_slice(input);
    let which = selector as usize % NODE_DECODERS.len();
    let what = NODE_DECODERS[which];
    macro_rules! round {
        ($decode:expr, $encode:expr) => {{
            match $decode(&bytes) {
                Ok(v) => {
                    let again = $encode(&v);
                    fixed_point(what, input, again, |b: &Bytes| {
                        $encode(&$decode(b).expect("a re-encoding decodes"))
                    });
                    true
                }
                Err(_) => false,
            }
        }};
    }
    match which {
        0 => round!(
            nc::decode_append_entries_request,
            nc::encode_append_entries_request
        ),
        1 => round!(
            |b: &Bytes| nc::decode_append_entries_response(b),
            nc::encode_append_entries_response
        ),
        2 => round!(
            |b: &Bytes| nc::decode_vote_request(b),
            nc::encode_vote_request
        ),
        3 => round!(
            |b: &Bytes| nc::decode_vote_response(b),
            nc::encode_vote_response
        ),
        4 => round!(nc::decode_snapshot_chunk, nc::encode_snapshot_chunk),
        5 => round!(
            |b: &Bytes| nc::decode_snapshot_response(b),
            nc::encode_snapshot_response
        ),
        6 => round!(
            |b: &Bytes| nc::decode_transfer_leader_request(b),
            nc::encode_transfer_leader_request
        ),
        7 => round!(
            |b: &Bytes| nc::decode_transfer_leader_response(b),
            nc::encode_transfer_leader_response
        ),
        8 => match nc::decode_propose_request(&bytes) {
            // The encoder refuses an empty proposal: so must the decoder.
            Ok(cmds) => {
                assert!(!cmds.is_empty(), "{what}: an empty proposal decoded");
                round!(
                    |b: &Bytes| nc::decode_propose_request(b),
                    |c: &Vec<Command>| nc::encode_propose_request(c)
                )
            }
            Err(_) => false,
        },
        9 => round!(
            |b: &Bytes| nc::decode_propose_response(GROUP, b),
            |(i, r): &(u64, Vec<nc::ProposeResult>)| nc::encode_propose_response(*i, r)
        ),
        10 => nc::decode_read_index_request(&bytes).is_ok(),
        11 => round!(
            |b: &Bytes| nc::decode_read_index_response(GROUP, b),
            nc::encode_read_index_response
        ),
        _ => round!(decode_entry, |e| Bytes::from(encode_entry(e))),
    }
}

fn encode_command(c: &Command) -> Bytes {
    let mut v = Vec::new();
    c.encode_into(&mut v);
    Bytes::from(v)
}

/// Decodes `data[1..]` as one command (`data[0]` even) or a batch whose commands are then
/// each decoded (odd); returns how many commands decoded.
pub fn check_chat_command(data: &[u8]) -> usize {
    let Some((&selector, input)) = data.split_first() else {
        return 0;
    };
    if selector % 2 == 0 {
        return match Command::decode(input) {
            Ok(c) => {
                let again = encode_command(&c);
                assert_eq!(
                    Command::decode(&again).as_ref(),
                    Ok(&c),
                    "a re-encoded command decodes differently"
                );
                assert_eq!(
                    encode_command(&c),
                    again,
                    "command re-encoding is not stable"
                );
                1
            }
            Err(_) => 0,
        };
    }
    let Ok(batch) = DecodedBatch::parse(Bytes::copy_from_slice(input)) else {
        return 0;
    };
    let mut decoded = Vec::new();
    for pos in 0..batch.len() {
        if let Ok(c) = batch.command(pos) {
            decoded.push(c);
        }
    }
    assert!(
        batch.command(batch.len()).is_err(),
        "a command past the end decoded"
    );
    if decoded.len() == batch.len() {
        let again = chatlog_raft::chat::command::Batch {
            timestamp_ms: batch.timestamp_ms,
            commands: decoded.clone(),
        }
        .encode();
        let reparsed = DecodedBatch::parse(again).expect("a re-encoded batch parses");
        assert_eq!(reparsed.len(), decoded.len());
        for (pos, c) in decoded.iter().enumerate() {
            assert_eq!(
                reparsed.command(pos).as_ref(),
                Ok(c),
                "command {pos} differs"
            );
        }
    }
    decoded.len()
}
