//! Bytes of Raft state on disk: log ids, votes, memberships and log entries.
//!
//! What it owns: the encodings, byte by byte, and their checks on decode. What it must
//! not do: I/O. The storage engine checks a CRC32 over every record before these bytes
//! reach us; the decoders here check structure (version, kind, lengths, counts, no
//! trailing bytes) so that a bug or a format mix-up stops the group instead of feeding
//! openraft a wrong entry.
//!
//! Hand-written rather than serde + a binary format crate: the formats are small and
//! fixed, they are documented here once for disk and (later) the node-to-node wire, no
//! dependency is added, and a `ChatBatch` payload is sliced out of the engine's buffer
//! without a copy. All integers are little-endian and fixed-width.
//!
//! ```text
//! LogId (24 bytes)     0 term u64 | 8 node_id u64 | 16 index u64
//! Vote  (17 bytes)     0 term u64 | 8 node_id u64 | 16 committed u8 (0 or 1)
//! Membership           0 config_count u32 (0..=MEMBERSHIP_CONFIGS_MAX; 0 is openraft's
//!                      empty default membership)
//!                      then per config: voter_count u32 | voter_count × node_id u64 (ascending)
//!                      then node_count u32 | node_count × node_id u64 (ascending; every node:
//!                      voters and learners; a voter missing here is an error)
//! Entry                0 version u8 (= ENTRY_VERSION) | 1 kind u8 | 2 LogId (24 bytes)
//!                      | 26 body: kind 0 blank: empty
//!                                 kind 1 normal: the ChatBatch bytes, to the end
//!                                 kind 2 membership: a Membership, to the end
//! ```

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::types::{
    ChatBatch, Entry, EntryPayload, LeaderId, LogId, Membership, Node, NodeId, Vote,
};

/// Bytes of an encoded `LogId`.
pub const LOG_ID_BYTES: usize = 24;
/// Bytes of an encoded `Vote`.
pub const VOTE_BYTES: usize = 17;
/// Version byte of the entry format.
pub const ENTRY_VERSION: u8 = 1;
/// Bytes before an entry's body.
pub const ENTRY_HEADER_BYTES: usize = 2 + LOG_ID_BYTES;
/// Configs in one membership. Openraft uses one, or two while a change is joint; a few
/// more leaves room without letting a bad count allocate.
pub const MEMBERSHIP_CONFIGS_MAX: usize = 8;

const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

/// Bytes that did not decode. Says which structure and which check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {detail}")]
pub struct DecodeError {
    /// The structure being decoded ("log id", "vote", "log entry", …).
    pub what: &'static str,
    /// The check that failed.
    pub detail: String,
}

impl DecodeError {
    /// A failed check of `what`.
    pub fn new(what: &'static str, detail: impl Into<String>) -> DecodeError {
        DecodeError {
            what,
            detail: detail.into(),
        }
    }
}

/// Appends `log_id` to `out`.
pub fn put_log_id(out: &mut Vec<u8>, log_id: &LogId) {
    out.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&log_id.leader_id.node_id.to_le_bytes());
    out.extend_from_slice(&log_id.index.to_le_bytes());
}

/// `log_id` alone, as a meta value.
pub fn encode_log_id(log_id: &LogId) -> Vec<u8> {
    let mut out = Vec::with_capacity(LOG_ID_BYTES);
    put_log_id(&mut out, log_id);
    out
}

/// Decodes a value made by [`encode_log_id`].
pub fn decode_log_id(bytes: &[u8]) -> Result<LogId, DecodeError> {
    let mut r = Reader::new("log id", bytes);
    let id = r.log_id()?;
    r.finish()?;
    Ok(id)
}

/// Appends `vote` to `out`.
pub fn put_vote(out: &mut Vec<u8>, vote: &Vote) {
    out.extend_from_slice(&vote.leader_id.term.to_le_bytes());
    out.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
    out.push(u8::from(vote.committed));
}

/// `vote` as a meta value.
pub fn encode_vote(vote: &Vote) -> Vec<u8> {
    let mut out = Vec::with_capacity(VOTE_BYTES);
    put_vote(&mut out, vote);
    out
}

/// Decodes a value made by [`encode_vote`].
pub fn decode_vote(bytes: &[u8]) -> Result<Vote, DecodeError> {
    let mut r = Reader::new("vote", bytes);
    let vote = r.vote()?;
    r.finish()?;
    Ok(vote)
}

/// Appends `membership` to `out`.
pub fn put_membership(out: &mut Vec<u8>, membership: &Membership) {
    let configs = membership.get_joint_config();
    put_len(out, configs.len());
    for config in configs {
        put_len(out, config.len());
        for id in config {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    let nodes: Vec<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    put_len(out, nodes.len());
    for id in nodes {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// Encodes a log entry for the engine.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let body_hint = match &entry.payload {
        EntryPayload::Normal(batch) => batch.0.len(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(ENTRY_HEADER_BYTES + body_hint);
    out.push(ENTRY_VERSION);
    out.push(match &entry.payload {
        EntryPayload::Blank => KIND_BLANK,
        EntryPayload::Normal(_) => KIND_NORMAL,
        EntryPayload::Membership(_) => KIND_MEMBERSHIP,
    });
    put_log_id(&mut out, &entry.log_id);
    match &entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Normal(batch) => out.extend_from_slice(&batch.0),
        EntryPayload::Membership(m) => put_membership(&mut out, m),
    }
    out
}

/// FNV-1a 64: its offset basis, the starting value of [`fnv1a_update`].
pub const FNV1A_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues the 64-bit FNV-1a hash `h` over `bytes`. Stable across builds and platforms
/// (a std `Hasher` is not): for ids derived alike on every node, and for digests that
/// replicas compare. Not a checksum of record.
pub fn fnv1a_update(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The 64-bit FNV-1a hash of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_update(FNV1A_OFFSET, bytes)
}

/// A 64-bit FNV-1a digest of an entry's payload (kind and bytes, not its log id), for
/// diagnostics: replicas that applied the same entry log the same digest
/// (`state_machine` at debug level, `tests/dump_raft_log.rs`). Not a checksum of record.
pub fn payload_digest(entry: &Entry) -> u64 {
    let mut h = FNV1A_OFFSET;
    let mut eat = |bytes: &[u8]| h = fnv1a_update(h, bytes);
    match &entry.payload {
        EntryPayload::Blank => eat(&[KIND_BLANK]),
        EntryPayload::Normal(batch) => {
            eat(&[KIND_NORMAL]);
            eat(&batch.0);
        }
        EntryPayload::Membership(m) => {
            eat(&[KIND_MEMBERSHIP]);
            let mut out = Vec::new();
            put_membership(&mut out, m);
            eat(&out);
        }
    }
    h
}

/// Decodes an entry made by [`encode_entry`]. A normal entry's batch is a slice of
/// `bytes` (no copy).
pub fn decode_entry(bytes: &Bytes) -> Result<Entry, DecodeError> {
    let mut r = Reader::new("log entry", bytes);
    let version = r.u8()?;
    if version != ENTRY_VERSION {
        return Err(DecodeError::new(
            "log entry",
            format!("version {version}, expected {ENTRY_VERSION}"),
        ));
    }
    let kind = r.u8()?;
    let log_id = r.log_id()?;
    let payload = match kind {
        KIND_BLANK => {
            r.finish()?;
            EntryPayload::Blank
        }
        KIND_NORMAL => EntryPayload::Normal(ChatBatch(bytes.slice(ENTRY_HEADER_BYTES..))),
        KIND_MEMBERSHIP => {
            let m = r.membership()?;
            r.finish()?;
            EntryPayload::Membership(m)
        }
        other => {
            return Err(DecodeError::new(
                "log entry",
                format!("unknown payload kind {other}"),
            ));
        }
    };
    Ok(Entry { log_id, payload })
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Membership sizes are tiny; a count above u32 would be a bug upstream.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

/// A cursor over bytes being decoded; every read checks the remaining length first.
#[derive(Debug)]
pub struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Starts decoding `bytes` as a `what`.
    pub fn new(what: &'static str, bytes: &'a [u8]) -> Reader<'a> {
        Reader { what, bytes, at: 0 }
    }

    /// The next byte, without consuming it (`None` at the end).
    pub fn peek_u8(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> usize {
        self.at
    }

    /// An error about the structure being decoded, for checks made by the caller.
    pub fn error(&self, detail: impl Into<String>) -> DecodeError {
        DecodeError::new(self.what, detail)
    }

    /// The next `n` bytes, as they are.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(DecodeError::new(
                self.what,
                format!("needs {n} bytes at offset {}, {left} left", self.at),
            ));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// A byte that must be 0 or 1.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::new(
                self.what,
                format!("flag byte {b} at offset {}", self.at - 1),
            )),
        }
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.take(n)
    }

    /// A u32 length, checked against `max` and the bytes left, then that many bytes.
    pub fn len_prefixed(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::new(
                self.what,
                format!(
                    "length {n} at offset {} is over the limit {max}",
                    self.at - 4
                ),
            ));
        }
        self.take(n)
    }

    /// A u32-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let at = self.at;
        let b = self.len_prefixed(max)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| DecodeError::new(self.what, format!("invalid UTF-8 at offset {at}")))
    }

    /// A u32 count of items of at least `item_bytes` each, checked against `max` and
    /// against the bytes left, so a caller may allocate for it.
    pub fn item_count(&mut self, item_bytes: usize, max: usize) -> Result<usize, DecodeError> {
        let n = self.count(item_bytes.max(1))?;
        if n > max {
            return Err(DecodeError::new(
                self.what,
                format!(
                    "count {n} at offset {} is over the limit {max}",
                    self.at - 4
                ),
            ));
        }
        Ok(n)
    }

    /// A u64 count (the chat state's and its commands' width; [`Reader::item_count`] is
    /// the u32 one) of items of `item_bytes` each, checked against `max` and against the
    /// bytes left, so a forged count cannot make the caller allocate or loop for nothing.
    pub fn u64_count(&mut self, item_bytes: usize, max: usize) -> Result<usize, DecodeError> {
        let n = self.u64()?;
        if n > max as u64 || (n as usize).saturating_mul(item_bytes) > self.remaining() {
            return Err(self.error(format!("count {n} exceeds the limit or the bytes left")));
        }
        Ok(n as usize)
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// A `LogId`.
    pub fn log_id(&mut self) -> Result<LogId, DecodeError> {
        let term = self.u64()?;
        let node_id = self.u64()?;
        let index = self.u64()?;
        Ok(crate::types::log_id(term, node_id, index))
    }

    /// A `Vote`.
    pub fn vote(&mut self) -> Result<Vote, DecodeError> {
        let term = self.u64()?;
        let node_id = self.u64()?;
        let committed = self.bool()?;
        Ok(Vote {
            leader_id: LeaderId { term, node_id },
            committed,
        })
    }

    /// A count (u32) of items of at least `item_bytes` bytes each, checked against the
    /// bytes left before the caller allocates for them.
    pub fn count(&mut self, item_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        let left = self.bytes.len() - self.at;
        if n.saturating_mul(item_bytes) > left {
            return Err(DecodeError::new(
                self.what,
                format!(
                    "count {n} at offset {} exceeds the {left} bytes left",
                    self.at - 4
                ),
            ));
        }
        Ok(n)
    }

    /// A `Membership`.
    pub fn membership(&mut self) -> Result<Membership, DecodeError> {
        let config_count = self.count(4)?;
        if config_count > MEMBERSHIP_CONFIGS_MAX {
            return Err(DecodeError::new(
                self.what,
                format!("{config_count} membership configs (at most {MEMBERSHIP_CONFIGS_MAX})"),
            ));
        }
        let mut configs = Vec::with_capacity(config_count);
        for _ in 0..config_count {
            let n = self.count(8)?;
            let mut config = BTreeSet::new();
            for _ in 0..n {
                let id = self.u64()?;
                self.ascending(config.last(), id)?;
                config.insert(id);
            }
            configs.push(config);
        }
        let n = self.count(8)?;
        let mut nodes = BTreeMap::new();
        for _ in 0..n {
            let id = self.u64()?;
            self.ascending(nodes.keys().next_back(), id)?;
            nodes.insert(id, Node::default());
        }
        Membership::new(configs, nodes)
            .map_err(|e| DecodeError::new(self.what, format!("invalid membership: {e}")))
    }

    /// Node ids are written in ascending order without repeats (the encoding is
    /// canonical: one membership, one byte string); anything else is refused, not
    /// silently reordered (found by the `node_codec` fuzz target).
    fn ascending(&self, previous: Option<&u64>, id: u64) -> Result<(), DecodeError> {
        if previous.is_some_and(|p| *p >= id) {
            return Err(DecodeError::new(
                self.what,
                format!("node id {id} out of order in a membership"),
            ));
        }
        Ok(())
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.at != self.bytes.len() {
            return Err(DecodeError::new(
                self.what,
                format!("{} trailing bytes", self.bytes.len() - self.at),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::log_id;

    fn membership(configs: &[&[u64]], learners: &[u64]) -> Membership {
        let configs: Vec<BTreeSet<u64>> = configs
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect();
        Membership::new_with_defaults(configs, learners.iter().copied())
    }

    #[test]
    fn log_id_and_vote_round_trip() {
        let id = log_id(7, 3, 1 << 40);
        let bytes = encode_log_id(&id);
        assert_eq!(bytes.len(), LOG_ID_BYTES);
        assert_eq!(decode_log_id(&bytes), Ok(id));

        for vote in [Vote::new(9, 2), Vote::new_committed(9, 2)] {
            let bytes = encode_vote(&vote);
            assert_eq!(bytes.len(), VOTE_BYTES);
            assert_eq!(decode_vote(&bytes), Ok(vote));
        }
    }

    #[test]
    fn entries_round_trip() {
        let entries = [
            Entry {
                log_id: log_id(1, 1, 0),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(2, 1, 1),
                payload: EntryPayload::Normal(ChatBatch(Bytes::from_static(b"post hello"))),
            },
            Entry {
                log_id: log_id(2, 1, 2),
                payload: EntryPayload::Normal(ChatBatch(Bytes::new())),
            },
            Entry {
                log_id: log_id(3, 2, 3),
                payload: EntryPayload::Membership(membership(&[&[1, 2, 3]], &[])),
            },
            Entry {
                log_id: log_id(3, 2, 4),
                payload: EntryPayload::Membership(membership(&[&[1, 2, 3], &[3, 4, 5]], &[9])),
            },
        ];
        for entry in entries {
            let bytes = Bytes::from(encode_entry(&entry));
            assert_eq!(decode_entry(&bytes), Ok(entry));
        }
    }

    #[test]
    fn malformed_entries_are_refused() {
        let entry = Entry {
            log_id: log_id(3, 2, 3),
            payload: EntryPayload::Membership(membership(&[&[1, 2]], &[])),
        };
        let good = encode_entry(&entry);
        // Every strict prefix is refused (none is a valid membership entry: a cut count
        // or id fails the length checks, a cut list fails `Membership::new`).
        for len in 0..good.len() {
            let cut = Bytes::copy_from_slice(&good[..len]);
            assert!(decode_entry(&cut).is_err(), "prefix of {len} bytes decoded");
        }
        // Trailing bytes, a wrong version, an unknown kind.
        let mut long = good.clone();
        long.push(0);
        assert!(decode_entry(&Bytes::from(long)).is_err());
        let mut bad = good.clone();
        bad[0] = 99;
        assert!(decode_entry(&Bytes::from(bad)).is_err());
        let mut bad = good.clone();
        bad[1] = 7;
        assert!(decode_entry(&Bytes::from(bad)).is_err());
        // A huge count is refused before anything is allocated for it.
        let mut huge = good[..ENTRY_HEADER_BYTES].to_vec();
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_entry(&Bytes::from(huge)).is_err());
        // A voter that is not among the nodes is an invalid membership.
        let mut orphan = good[..ENTRY_HEADER_BYTES].to_vec();
        for v in [1u32, 1] {
            orphan.extend_from_slice(&v.to_le_bytes());
        }
        orphan.extend_from_slice(&5u64.to_le_bytes());
        orphan.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_entry(&Bytes::from(orphan)).is_err());
        // A bad vote flag.
        let mut vote = encode_vote(&Vote::new(1, 1));
        vote[16] = 2;
        assert!(decode_vote(&vote).is_err());
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // Cluster ids, name groups and replica digests are derived with it on every node:
        // a change of the function would split clusters made by older versions.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_update(fnv1a(b"foo"), b"bar"), fnv1a(b"foobar"));
    }
}
