//! Incremental checkpoints of the per-chat and per-user event indexes: the part of the
//! state that grows with history, cut into immutable chunks by Raft index.
//!
//! What it owns: which Raft index ranges are chunks ([`ChunkRegion`]), the bytes of one
//! chunk ([`encode_chunk`] / [`decode_chunk`]) and the state encoding that leaves the
//! chunked locations out ([`encode_outside`] / [`decode_outside`]). What it must not do:
//! I/O, clocks or anything but the state and the applied index (`crate::checkpoint_chunks`
//! writes and reads the bytes), so two replicas with the same applied state produce the
//! same chunks and the same rest, byte for byte.
//!
//! # Chunks
//!
//! Chunk `k` holds every index location whose Raft index lies in
//! `[k × CHUNK_ENTRIES, (k + 1) × CHUNK_ENTRIES)`. Locations only ever get appended in
//! Raft index order, so once the applied index passed the end of chunk `k`, its
//! locations never change again, except that retention drops the oldest (then the chunk
//! is no longer used: the region starts at the first chunk wholly above the trim
//! horizon) and a delete marks one erased (so chunks store every location with its
//! erased flag cleared, and the rest of the state lists the erased seqs inside the
//! region). A chunk is therefore written once and referenced by every later checkpoint
//! until retention passes it.
//!
//! ```text
//! chunk   version u8 (1) | k u64 | CHUNK_ENTRIES u64 | runs u64
//!         | runs × (owner u8 (0 user, 1 chat) | id u64 | first_seq u64
//!                   | count u64 | count × (packed u64, sender u64))
//!         runs in the state's encoding order (users by id, then chats by id)
//! ```
//!
//! # The rest (the checkpoint's state bytes)
//!
//! `version u8 (1) | CHUNK_ENTRIES u64 | first chunk u64 | end chunk u64 |` then
//! `GroupState::encode_with` where each event index is written as
//! `before (locations below the region) | region_count u64 | erased count u64 | erased
//! seqs u64… | after (locations above the region)`, `before`/`after` as `count u64 |
//! count × (packed u64, sender u64)`. Its size is the state without the region's
//! locations: users, chats, members, the dedupe window, … and at most two chunks' worth
//! of locations (below the region: the partly trimmed chunk; above it: the one being
//! filled), plus 8 bytes per deleted message still retained.

use std::collections::BTreeMap;

use crate::chat::retention::EventIndex;
pub use crate::chat::state::IndexOwner;
use crate::chat::state::{EventLoc, GroupState, LocsCodec, read_locs, write_locs};
use crate::codec::{DecodeError, Reader};

/// Raft entries per index chunk: 16,384. Why: a chunk is written once when the applied
/// index passes its end, so a checkpoint writes at most the chunks completed since the
/// last one plus the open one's locations; at 16 B per indexed event and up to a few
/// hundred events per entry a chunk is a few MiB, and the checkpoint's chunk directory
/// grows by one 36-byte record per 16,384 entries of retained history.
pub const CHUNK_ENTRIES: u64 = 16_384;

const CHUNK_VERSION: u8 = 1;
const REST_VERSION: u8 = 1;
const OWNER_USER: u8 = 0;
const OWNER_CHAT: u8 = 1;

/// The chunks a checkpoint references: `[first, end)`, each wholly applied and wholly
/// above the retention horizon (empty when `first >= end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRegion {
    /// The first chunk.
    pub first: u64,
    /// One past the last chunk.
    pub end: u64,
}

impl ChunkRegion {
    /// The region of a state applied through Raft index `applied` whose indexes keep
    /// nothing below Raft index `retained_from`: a function of the two only.
    pub fn of(applied: u64, retained_from: u64) -> ChunkRegion {
        let first = retained_from.div_ceil(CHUNK_ENTRIES);
        let end = (applied + 1) / CHUNK_ENTRIES;
        ChunkRegion {
            first,
            end: end.max(first),
        }
    }

    /// Whether no chunk is referenced.
    pub fn is_empty(&self) -> bool {
        self.first >= self.end
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> std::ops::Range<u64> {
        self.first..self.end
    }

    /// Raft indexes the region covers.
    fn raft_range(&self) -> std::ops::Range<u64> {
        self.first * CHUNK_ENTRIES..self.end * CHUNK_ENTRIES
    }
}

/// Index `i` of `locs`' first location at or above Raft index `raft_index`.
fn split_at(locs: &[EventLoc], raft_index: u64) -> usize {
    locs.partition_point(|l| l.raft_index() < raft_index)
}

/// The bytes of chunk `k` of `state`'s indexes (module docs). The caller makes sure the
/// chunk is complete (`k` below the region's end).
pub fn encode_chunk(state: &GroupState, k: u64) -> Vec<u8> {
    let (lo, hi) = (k * CHUNK_ENTRIES, (k + 1) * CHUNK_ENTRIES);
    let mut out = vec![CHUNK_VERSION];
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&CHUNK_ENTRIES.to_le_bytes());
    let runs_at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    let mut runs = 0u64;
    let mut masked = Vec::new();
    for (owner, index) in state.event_indexes() {
        let kept = index.kept();
        let (a, b) = (split_at(kept, lo), split_at(kept, hi));
        if a == b {
            continue;
        }
        runs += 1;
        let (tag, id) = match owner {
            IndexOwner::User(id) => (OWNER_USER, id),
            IndexOwner::Chat(id) => (OWNER_CHAT, id),
        };
        out.push(tag);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(index.first_seq() + a as u64).to_le_bytes());
        masked.clear();
        masked.extend(kept[a..b].iter().map(|l| l.unerased()));
        write_locs(&mut out, &masked);
    }
    out[runs_at..runs_at + 8].copy_from_slice(&runs.to_le_bytes());
    out
}

/// One decoded chunk: per owner, the first seq and the locations.
pub type ChunkRuns = Vec<(IndexOwner, u64, Vec<EventLoc>)>;

/// Decodes chunk `k` made by [`encode_chunk`], every location checked.
pub fn decode_chunk(k: u64, bytes: &[u8]) -> Result<ChunkRuns, DecodeError> {
    let mut r = Reader::new("index chunk", bytes);
    let version = r.u8()?;
    if version != CHUNK_VERSION {
        return Err(r.error(format!("version {version}, expected {CHUNK_VERSION}")));
    }
    let (got_k, entries) = (r.u64()?, r.u64()?);
    if got_k != k || entries != CHUNK_ENTRIES {
        return Err(r.error(format!(
            "chunk {got_k} of {entries} entries where chunk {k} of {CHUNK_ENTRIES} was expected"
        )));
    }
    let runs = r.u64_count(33, bytes.len())?;
    let (lo, hi) = (k * CHUNK_ENTRIES, (k + 1) * CHUNK_ENTRIES);
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let owner = match r.u8()? {
            OWNER_USER => IndexOwner::User(r.u64()?),
            OWNER_CHAT => IndexOwner::Chat(r.u64()?),
            t => return Err(r.error(format!("owner kind {t}"))),
        };
        let first_seq = r.u64()?;
        let locs = read_locs(&mut r)?;
        if locs.is_empty()
            || locs
                .iter()
                .any(|l| !(lo..hi).contains(&l.raft_index()) || l.erased())
        {
            return Err(r.error(format!("a run of {owner:?} outside chunk {k}")));
        }
        out.push((owner, first_seq, locs));
    }
    r.finish()?;
    Ok(out)
}

/// Writes each index without the region's locations (module docs, "The rest").
struct Outside {
    region: ChunkRegion,
}

impl LocsCodec for Outside {
    fn write(&mut self, _owner: IndexOwner, index: &EventIndex, out: &mut Vec<u8>) {
        let kept = index.kept();
        let range = self.region.raft_range();
        let (a, b) = (split_at(kept, range.start), split_at(kept, range.end));
        write_locs(out, &kept[..a]);
        out.extend_from_slice(&((b - a) as u64).to_le_bytes());
        let first_seq = index.first_seq() + a as u64;
        let erased: Vec<u64> = if a == b {
            Vec::new()
        } else {
            index
                .erased_in(first_seq..=first_seq + (b - a) as u64 - 1)
                .collect()
        };
        out.extend_from_slice(&(erased.len() as u64).to_le_bytes());
        for s in erased {
            out.extend_from_slice(&s.to_le_bytes());
        }
        write_locs(out, &kept[b..]);
    }

    fn read(&mut self, _: IndexOwner, _: &mut Reader<'_>) -> Result<Vec<EventLoc>, DecodeError> {
        unreachable!("decoding goes through `Inside`")
    }

    fn capacity_hint(&self, _events: u64) -> usize {
        4096
    }
}

/// The state bytes of an incremental checkpoint of `state` at `applied`: the region and
/// everything outside it (module docs).
pub fn encode_outside(state: &GroupState, applied: u64) -> (ChunkRegion, Vec<u8>) {
    let region = ChunkRegion::of(applied, state.retained_from());
    let mut out = vec![REST_VERSION];
    out.extend_from_slice(&CHUNK_ENTRIES.to_le_bytes());
    out.extend_from_slice(&region.first.to_le_bytes());
    out.extend_from_slice(&region.end.to_le_bytes());
    out.extend_from_slice(&state.encode_with(&mut Outside { region }));
    (region, out)
}

/// The region named by bytes made by [`encode_outside`] (to fetch its chunks first).
pub fn region_of(bytes: &[u8]) -> Result<ChunkRegion, DecodeError> {
    let mut r = Reader::new("incremental checkpoint", bytes);
    let version = r.u8()?;
    if version != REST_VERSION {
        return Err(r.error(format!("version {version}, expected {REST_VERSION}")));
    }
    let entries = r.u64()?;
    if entries != CHUNK_ENTRIES {
        return Err(r.error(format!(
            "chunks of {entries} entries, this build uses {CHUNK_ENTRIES}"
        )));
    }
    let region = ChunkRegion {
        first: r.u64()?,
        end: r.u64()?,
    };
    if region.end < region.first {
        return Err(r.error(format!("a region [{}, {})", region.first, region.end)));
    }
    Ok(region)
}

/// Reads indexes written by [`Outside`], putting the region's locations (from the
/// chunks, in order) between `before` and `after` and marking the erased ones.
struct Inside {
    region: BTreeMap<IndexOwner, (u64, Vec<EventLoc>)>,
}

impl LocsCodec for Inside {
    fn write(&mut self, _: IndexOwner, _: &EventIndex, _: &mut Vec<u8>) {
        unreachable!("encoding goes through `Outside`")
    }

    fn read(
        &mut self,
        owner: IndexOwner,
        r: &mut Reader<'_>,
    ) -> Result<Vec<EventLoc>, DecodeError> {
        let mut locs = read_locs(r)?;
        let count = r.u64()?;
        let (first_seq, mut middle) = self.region.remove(&owner).unwrap_or((0, Vec::new()));
        if middle.len() as u64 != count {
            return Err(r.error(format!(
                "{owner:?} has {count} locations in the chunks, the chunks hold {}",
                middle.len()
            )));
        }
        for _ in 0..r.u64_count(8, usize::MAX)? {
            let seq = r.u64()?;
            let at = seq
                .checked_sub(first_seq)
                .filter(|i| *i < count)
                .ok_or_else(|| {
                    r.error(format!("{owner:?}: erased seq {seq} outside the chunks"))
                })?;
            middle[at as usize].erase();
        }
        locs.append(&mut middle);
        locs.append(&mut read_locs(r)?);
        Ok(locs)
    }

    fn capacity_hint(&self, _events: u64) -> usize {
        0
    }
}

/// Decodes bytes made by [`encode_outside`] with the region's chunks, decoded and in
/// order; every location of every chunk must land in an index, at the seqs the chunk
/// says.
pub fn decode_outside(bytes: &[u8], chunks: Vec<ChunkRuns>) -> Result<GroupState, DecodeError> {
    let mut region: BTreeMap<IndexOwner, (u64, Vec<EventLoc>)> = BTreeMap::new();
    for runs in chunks {
        for (owner, first_seq, mut locs) in runs {
            match region.get_mut(&owner) {
                None => {
                    region.insert(owner, (first_seq, locs));
                }
                Some((first, held)) => {
                    if *first + held.len() as u64 != first_seq {
                        return Err(DecodeError::new(
                            "incremental checkpoint",
                            format!(
                                "{owner:?}: a chunk run from seq {first_seq} after seqs {first}..{}",
                                *first + held.len() as u64
                            ),
                        ));
                    }
                    held.append(&mut locs);
                }
            }
        }
    }
    let region_start = region_of(bytes)?.first * CHUNK_ENTRIES;
    let firsts: Vec<(IndexOwner, u64)> = region.iter().map(|(o, (f, _))| (*o, *f)).collect();
    let mut inside = Inside { region };
    let state = GroupState::decode_with(&bytes[25..], &mut inside)?;
    if let Some(owner) = inside.region.keys().next() {
        return Err(DecodeError::new(
            "incremental checkpoint",
            format!("the chunks hold locations of {owner:?}, which the state does not have"),
        ));
    }
    // The chunks' seqs agree with where the locations landed (retention's base is known
    // only now, after the retention section).
    let index_of: BTreeMap<IndexOwner, &EventIndex> = state.event_indexes().collect();
    for (owner, first_seq) in firsts {
        let index = index_of[&owner];
        let landed = index.first_seq()
            + index
                .kept()
                .partition_point(|l| l.raft_index() < region_start) as u64;
        if landed != first_seq {
            return Err(DecodeError::new(
                "incremental checkpoint",
                format!(
                    "{owner:?}: the chunks start at seq {first_seq}, the state puts them at {landed}"
                ),
            ));
        }
    }
    Ok(state)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chat::command::{ChatKind, Command, Outcome};

    /// Creates user "ann" (Raft entry 1) and a group chat of hers (entry 2) in `st`;
    /// returns (user, chat). Shared with `checkpoint_chunks`'s tests.
    pub(crate) fn user_and_chat(st: &mut GroupState) -> (u64, u64) {
        let user = match st.apply(
            &Command::CreateUser {
                name: "ann".into(),
                login_token_hash: [1; 32],
            },
            1,
            1,
            0,
        ) {
            Outcome::UserCreated { user } => user,
            o => panic!("{o:?}"),
        };
        let chat = match st.apply(
            &Command::CreateChat {
                creator: user,
                kind: ChatKind::Group,
                title: "t".into(),
                members: vec![],
            },
            2,
            2,
            0,
        ) {
            Outcome::Event { chat, .. } => chat,
            o => panic!("{o:?}"),
        };
        (user, chat)
    }

    /// A state with one user, one chat and `posts` posts, one per Raft entry from 3.
    fn state_with(posts: u64) -> (GroupState, u64, u64, u64) {
        let mut st = GroupState::new(3);
        let (user, chat) = user_and_chat(&mut st);
        let mut index = 2;
        for _ in 0..posts {
            index += 1;
            post(&mut st, user, chat, index);
        }
        (st, user, chat, index)
    }

    /// Posts as Raft entry `index`, a minute after the one before (the de-duplication
    /// window, 15 minutes, stays small). Shared with `checkpoint_chunks`'s tests.
    pub(crate) fn post(st: &mut GroupState, user: u64, chat: u64, index: u64) {
        let o = st.apply(
            &Command::Post {
                chat,
                sender: user,
                client_message_id: index,
                text: "x".into(),
                media: None,
                reply_to: 0,
            },
            index * 60_000,
            index,
            0,
        );
        assert!(matches!(o, Outcome::Event { .. }), "{o:?}");
    }

    fn round_trip(st: &GroupState, applied: u64) -> Vec<u8> {
        let (region, rest) = encode_outside(st, applied);
        let chunks = region
            .chunks()
            .map(|k| decode_chunk(k, &encode_chunk(st, k)).expect("chunk decodes"))
            .collect();
        let back = decode_outside(&rest, chunks).expect("decodes");
        assert_eq!(&back, st, "the same state");
        assert_eq!(back.encode(), st.encode(), "byte-identical whole encoding");
        rest
    }

    #[test]
    fn the_rest_stays_small_and_decodes_with_the_chunks_to_the_same_state() {
        let (mut st, user, chat, mut index) = state_with(5 * CHUNK_ENTRIES + 100);
        let rest = round_trip(&st, index);
        assert_eq!(ChunkRegion::of(index, 0).chunks(), 0..5);
        // Outside the region: the 100 + 2 newest locations (and a few hundred bytes).
        assert!(rest.len() < 102 * 16 + 4096, "{} bytes", rest.len());
        // A delete inside a chunk: the chunk is unchanged, the rest names the seq.
        let chunk_before = encode_chunk(&st, 1);
        let o = st.apply(
            &Command::Delete {
                chat,
                sender: user,
                target: CHUNK_ENTRIES + 7,
            },
            (index + 1) * 60_000,
            index + 1,
            0,
        );
        assert!(matches!(o, Outcome::Event { .. }), "{o:?}");
        index += 1;
        assert_eq!(encode_chunk(&st, 1), chunk_before, "chunks never change");
        round_trip(&st, index);
        // Retention: the region starts above the horizon; the trimmed part of chunk 2
        // goes into the rest.
        st.trim_below(2 * CHUNK_ENTRIES + 10);
        let (region, _) = encode_outside(&st, index);
        assert_eq!(region.chunks(), 3..5);
        round_trip(&st, index);
        for _ in 0..CHUNK_ENTRIES {
            index += 1;
            post(&mut st, user, chat, index);
        }
        round_trip(&st, index);
    }

    #[test]
    fn damaged_or_mismatched_chunks_are_refused() {
        let (st, _, _, index) = state_with(2 * CHUNK_ENTRIES);
        let (_, rest) = encode_outside(&st, index);
        let c0 = encode_chunk(&st, 0);
        let c1 = encode_chunk(&st, 1);
        assert!(decode_chunk(1, &c0).is_err(), "chunk 0 named 1");
        let mut bad = c1.clone();
        // The last location's Raft index (its packed word is the 16 bytes before the end,
        // the index from its fourth byte on).
        let at = bad.len() - 16 + 4;
        bad[at] ^= 0x80;
        assert!(
            decode_chunk(1, &bad).is_err(),
            "a location outside its chunk"
        );
        let only_one = vec![decode_chunk(0, &c0).unwrap()];
        assert!(decode_outside(&rest, only_one).is_err(), "a chunk missing");
        let swapped = vec![decode_chunk(1, &c1).unwrap(), decode_chunk(0, &c0).unwrap()];
        assert!(
            decode_outside(&rest, swapped).is_err(),
            "chunks out of order"
        );
    }
}
