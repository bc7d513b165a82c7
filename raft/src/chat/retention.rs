//! Log retention in the applied state: which Raft entries the per-chat and per-user
//! indexes may still point at, and the index type that forgets what lies below.
//!
//! What it owns: [`EventIndex`] (a seq → location index whose oldest seqs can be
//! dropped while seqs stay what they were), [`RetentionPolicy`] (how much of the log a
//! node keeps: entries, bytes or both) and the rule that turns each applied entry into a
//! trim horizon ([`RetentionPolicy::note_entry`], with the [`ByteLedger`] of the size
//! limit, which is part of the state). What it must not do: read clocks, look at the disk or
//! depend on anything but applied entries and the policy: every replica trims at the same
//! entries to the same horizon, so the encoded state stays byte-identical.
//!
//! The policy is replicated state (session 8): a group's policy lives in its
//! `GroupState` and changes only when a [`RetentionCommand`] (chat command tags 80–84)
//! is applied, so every replica trims under the same policy whatever flags its node runs
//! with and however often the cluster restarts. `--retain-entries` / `--retain-bytes`
//! only *seed* it: a group's leader proposes them with `only_if_unset` while the group has
//! no policy (`crate::retention`); `chatlog admin retention set` (`POST /admin/retention`)
//! changes it while the cluster serves.
//!
//! The physical purge of the Raft log (`crate::retention`) follows this horizon, further
//! held back by what only one replica knows (its durable checkpoint, its eraser).

use std::collections::VecDeque;

use crate::chat::state::EventLoc;
use crate::codec::{DecodeError, Reader};

/// Entries between two trims of the indexes, at most. Why: a trim walks every chat and
/// user of the group, so it runs every `retain_entries / 8` entries (at least 1, at most
/// this), not on every entry; history below the horizon lingers at most this long.
pub const TRIM_EVERY_ENTRIES_MAX: u64 = 10_000;

/// Entries between two marks of the byte ledger (and between two byte-policy trims).
pub const MARK_EVERY_ENTRIES: u64 = 64;
/// Marks the byte ledger holds at most (16 bytes each in memory and in the checkpoint:
/// 1 MiB). Why: a large `retain_bytes` over small entries would need more; past this the
/// oldest mark goes, so the byte policy then keeps at most `MARKS_MAX ×
/// MARK_EVERY_ENTRIES` (4 Mi) entries.
pub const MARKS_MAX: usize = 1 << 16;

/// How much of a group's Raft log a node keeps: the same on every replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest this many Raft entries (and every entry still needed: pending
    /// secret messages, entries above the durable checkpoint). `None`: no entry limit.
    pub retain_entries: Option<u64>,
    /// Keep the newest entries whose bytes (payload plus entry header) sum to at least
    /// this, plus less than [`MARK_EVERY_ENTRIES`] entries more. `None`: no byte limit.
    /// With both limits the stricter one wins.
    pub retain_bytes: Option<u64>,
}

impl RetentionPolicy {
    /// Keeps everything (the default).
    pub fn keep_all() -> RetentionPolicy {
        RetentionPolicy::default()
    }

    /// Whether any limit is set.
    pub fn is_some(&self) -> bool {
        self.retain_entries.is_some() || self.retain_bytes.is_some()
    }

    /// Records the entry at `raft_index` (`bytes` long) in `ledger` and says whether
    /// the indexes are trimmed there, and to which horizon. Deterministic: a function of
    /// the applied entries and the policy (the ledger is part of the state).
    pub fn note_entry(&self, ledger: &mut ByteLedger, raft_index: u64, bytes: u64) -> Option<u64> {
        let by_entries = self.trim_at(raft_index);
        let by_bytes = self
            .retain_bytes
            .and_then(|keep| ledger.note(raft_index, bytes, keep));
        by_entries.max(by_bytes)
    }

    /// Whether applying the entry at `raft_index` trims the indexes, and to which
    /// horizon (the first Raft index they keep). Deterministic: a function of the index
    /// and the policy only.
    pub fn trim_at(&self, raft_index: u64) -> Option<u64> {
        let keep = self.retain_entries?.max(1);
        let every = (keep / 8).clamp(1, TRIM_EVERY_ENTRIES_MAX);
        if !raft_index.is_multiple_of(every) || raft_index < keep {
            return None;
        }
        Some(raft_index + 1 - keep)
    }
}

// ---- replicated policy (s8retention; chat command tags 80-84) ----

/// Chat command tags of retention commands (80–84; 81–84 are free for later ones).
pub mod tag {
    /// [`super::RetentionCommand`].
    pub const SET_POLICY: u8 = 80;
    /// Every tag this module owns.
    pub const RANGE: std::ops::RangeInclusive<u8> = 80..=84;
}

/// Sets a group's retention policy (replicated: applied in log order on every replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionCommand {
    /// The new policy; [`RetentionPolicy::keep_all`] sets "keep everything" explicitly.
    pub policy: RetentionPolicy,
    /// Apply only while the group has no policy yet (the seed from a node's flags, which
    /// must never undo an operator's `admin retention set`).
    pub only_if_unset: bool,
}

/// Flag bits of an encoded [`RetentionCommand`] / policy.
const HAS_ENTRIES: u8 = 1;
const HAS_BYTES: u8 = 2;
const ONLY_IF_UNSET: u8 = 4;

impl RetentionPolicy {
    /// Appends `flags u8 | entries u64 | bytes u64` (absent limits as 0), with `extra`
    /// flag bits.
    fn encode_with_flags(&self, extra: u8, out: &mut Vec<u8>) {
        let flags = extra
            | if self.retain_entries.is_some() {
                HAS_ENTRIES
            } else {
                0
            }
            | if self.retain_bytes.is_some() {
                HAS_BYTES
            } else {
                0
            };
        out.push(flags);
        out.extend_from_slice(&self.retain_entries.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.retain_bytes.unwrap_or(0).to_le_bytes());
    }

    /// Reads what `encode_with_flags` wrote; the flags byte too.
    fn decode_with_flags(r: &mut Reader<'_>) -> Result<(RetentionPolicy, u8), DecodeError> {
        let flags = r.u8()?;
        if flags & !(HAS_ENTRIES | HAS_BYTES | ONLY_IF_UNSET) != 0 {
            return Err(r.error(format!("retention policy flags {flags:#x}")));
        }
        let (entries, bytes) = (r.u64()?, r.u64()?);
        let policy = RetentionPolicy {
            retain_entries: (flags & HAS_ENTRIES != 0).then_some(entries),
            retain_bytes: (flags & HAS_BYTES != 0).then_some(bytes),
        };
        Ok((policy, flags))
    }

    /// Why the policy cannot be applied, if it cannot: a limit of 0 keeps nothing.
    pub fn invalid(&self) -> Option<&'static str> {
        (self.retain_entries == Some(0) || self.retain_bytes == Some(0))
            .then_some("a retention limit must be at least 1 (leave it out for no limit)")
    }

    /// For people and logs: `entries=N bytes=B`, `keep-all`.
    pub fn describe(&self) -> String {
        match (self.retain_entries, self.retain_bytes) {
            (None, None) => "keep-all".into(),
            (e, b) => [
                e.map(|e| format!("entries={e}")),
                b.map(|b| format!("bytes={b}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" "),
        }
    }
}

impl RetentionCommand {
    /// Appends the command's bytes: `tag 80 | flags u8 | entries u64 | bytes u64`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(tag::SET_POLICY);
        let extra = if self.only_if_unset { ONLY_IF_UNSET } else { 0 };
        self.policy.encode_with_flags(extra, out);
    }

    /// Reads the fields after tag `t` (one of [`tag::RANGE`]).
    pub fn decode_fields(t: u8, r: &mut Reader<'_>) -> Result<RetentionCommand, DecodeError> {
        if t != tag::SET_POLICY {
            return Err(r.error(format!("unknown retention command tag {t}")));
        }
        let (policy, flags) = RetentionPolicy::decode_with_flags(r)?;
        Ok(RetentionCommand {
            policy,
            only_if_unset: flags & ONLY_IF_UNSET != 0,
        })
    }
}

/// Tag of the policy section of the encoded state, written after the placement and only
/// once a policy was set (older checkpoints end before it and decode as "no policy").
/// Never equal to `placement::PLACEMENT_VERSION`, which may stand where it stands.
pub const POLICY_SECTION_TAG: u8 = 0xE8;
const _: () = assert!(POLICY_SECTION_TAG != crate::chat::placement::PLACEMENT_VERSION);

/// Appends the policy section (nothing for `None`).
pub fn encode_policy_section(policy: Option<RetentionPolicy>, out: &mut Vec<u8>) {
    if let Some(p) = policy {
        out.push(POLICY_SECTION_TAG);
        p.encode_with_flags(0, out);
    }
}

/// Reads the policy section if the next byte starts one; `None` otherwise.
pub fn decode_policy_section(r: &mut Reader<'_>) -> Result<Option<RetentionPolicy>, DecodeError> {
    if r.peek_u8() != Some(POLICY_SECTION_TAG) {
        return Ok(None);
    }
    r.u8()?;
    let (policy, flags) = RetentionPolicy::decode_with_flags(r)?;
    if flags & ONLY_IF_UNSET != 0 {
        return Err(r.error("a stored retention policy has no only-if-unset flag"));
    }
    Ok(Some(policy))
}

// ---- end replicated policy ----

/// Running byte counts of the applied log, for the byte policy: the total, and marks
/// `(raft index, total before it)` every [`MARK_EVERY_ENTRIES`] entries from the oldest
/// one still within the limit. Part of the state (`GroupState`'s retention section).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ByteLedger {
    total: u64,
    marks: VecDeque<(u64, u64)>,
}

impl ByteLedger {
    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0 && self.marks.is_empty()
    }

    fn note(&mut self, raft_index: u64, bytes: u64, keep: u64) -> Option<u64> {
        let at_mark = raft_index.is_multiple_of(MARK_EVERY_ENTRIES);
        if at_mark || self.marks.is_empty() {
            self.marks.push_back((raft_index, self.total));
            if self.marks.len() > MARKS_MAX {
                self.marks.pop_front();
            }
        }
        self.total += bytes;
        if !at_mark {
            return None;
        }
        // Drop marks while the next one alone still holds more than the limit: the
        // first one left starts the kept range, which holds at least `keep` bytes and
        // less than `keep` plus one mark's worth of entries.
        let mut dropped = false;
        while self.marks.len() >= 2 && self.total - self.marks[1].1 > keep {
            self.marks.pop_front();
            dropped = true;
        }
        if !dropped {
            return None;
        }
        self.marks.front().map(|(i, _)| *i)
    }

    /// Appends the ledger's bytes: `total u64 | count u64 × (index u64 | before u64)`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&(self.marks.len() as u64).to_le_bytes());
        for (i, b) in &self.marks {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
    }

    /// Reads what [`ByteLedger::encode_into`] wrote.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<ByteLedger, DecodeError> {
        let total = r.u64()?;
        let n = r.u64_count(16, MARKS_MAX)?;
        let mut marks = VecDeque::with_capacity(n);
        for _ in 0..n {
            marks.push_back((r.u64()?, r.u64()?));
        }
        Ok(ByteLedger { total, marks })
    }
}

/// The index of one chat's (or user's) events: `seq → location`, dense from seq 1, of
/// which the oldest `base` seqs may have been dropped by retention. Seqs never change:
/// [`EventIndex::len`] is the head seq whatever was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventIndex {
    /// Seqs `1..=base` were dropped.
    base: u64,
    /// `locs[k]` is where seq `base + 1 + k` lives.
    locs: Vec<EventLoc>,
    /// Derived (s7raft): the kept seqs whose location is marked erased, so an
    /// incremental checkpoint (`chat::index_chunks`) finds them without a scan.
    erased: std::collections::BTreeSet<u64>,
}

impl EventIndex {
    /// An index holding `locs` as seqs `1..=locs.len()`.
    pub fn from_locs(locs: Vec<EventLoc>) -> EventIndex {
        let erased = (1u64..)
            .zip(&locs)
            .filter(|(_, l)| l.erased())
            .map(|(seq, _)| seq)
            .collect();
        EventIndex {
            base: 0,
            locs,
            erased,
        }
    }

    /// Marks seq `k + 1` erased; its location, `None` if it was dropped or is beyond
    /// the head.
    pub fn erase(&mut self, k: usize) -> Option<EventLoc> {
        let i = k.checked_sub(self.base as usize)?;
        let loc = self.locs.get_mut(i)?;
        loc.erase();
        self.erased.insert(k as u64 + 1);
        Some(*loc)
    }

    /// The kept seqs marked erased within `seqs`, in order.
    pub fn erased_in(&self, seqs: std::ops::RangeInclusive<u64>) -> impl Iterator<Item = u64> + '_ {
        self.erased.range(seqs).copied()
    }

    /// The head seq (events ever indexed, dropped ones included).
    pub fn len(&self) -> usize {
        self.base as usize + self.locs.len()
    }

    /// Whether no event was ever indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Seqs dropped by retention (`1..=base`).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The first seq still held (`base + 1`; the head + 1 when none is).
    pub fn first_seq(&self) -> u64 {
        self.base + 1
    }

    /// Restores the dropped count of a decoded index (its locations are the kept ones).
    pub fn set_base(&mut self, base: u64) {
        // The erased seqs were counted from 1 by `from_locs`: shift them.
        let shift = base - self.base;
        self.base = base;
        if shift > 0 {
            self.erased = self.erased.iter().map(|s| s + shift).collect();
        }
    }

    /// Indexes the next seq.
    pub fn push(&mut self, loc: EventLoc) {
        self.locs.push(loc);
    }

    /// Where seq `k + 1` lives; `None` if it was dropped or is beyond the head.
    pub fn get(&self, k: usize) -> Option<&EventLoc> {
        k.checked_sub(self.base as usize)
            .and_then(|i| self.locs.get(i))
    }

    /// Mutable [`EventIndex::get`].
    pub fn get_mut(&mut self, k: usize) -> Option<&mut EventLoc> {
        k.checked_sub(self.base as usize)
            .and_then(|i| self.locs.get_mut(i))
    }

    /// Like `slice::partition_point` over all seqs, dropped ones counted as satisfying
    /// `pred` (they are older than every kept one). Searched from the newest end: it
    /// probes the last 1, 2, 4, … locations, then searches within the last step, so it
    /// costs O(log d) for a point d locations from the head. Its callers (the fan-out's
    /// cursors) ask for recent points: a search of the whole index touched a dozen cold
    /// cache lines per chat moved.
    pub fn partition_point(&self, mut pred: impl FnMut(&EventLoc) -> bool) -> usize {
        let locs = &self.locs;
        // Every location at `hi..` fails `pred`; `lo` is where the search may start.
        let (mut lo, mut hi, mut step) = (0, locs.len(), 1);
        while hi > 0 {
            let probe = hi.saturating_sub(step);
            if pred(&locs[probe]) {
                lo = probe + 1;
                break;
            }
            hi = probe;
            step *= 2;
        }
        self.base as usize + lo + locs[lo..hi].partition_point(pred)
    }

    /// The kept locations, oldest first (seq `first_seq()` onwards).
    pub fn kept(&self) -> &[EventLoc] {
        &self.locs
    }

    /// Drops the leading events that live below Raft index `horizon`; returns how many.
    pub fn trim_below(&mut self, horizon: u64) -> u64 {
        let n = self.locs.partition_point(|l| l.raft_index() < horizon);
        if n > 0 {
            self.locs.drain(..n);
            self.base += n as u64;
            self.erased = self.erased.split_off(&(self.base + 1));
        }
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The search from the newest end answers what a whole-index binary search does,
    /// for every point of random indexes (several locations per Raft index, some
    /// dropped by retention).
    #[test]
    fn partition_point_from_the_head_matches_a_whole_search() {
        use crate::chat::state::EventKind;

        let (seed, mut next) = crate::chat::test_rng::seeded();
        for _ in 0..200 {
            let len = next(300) as usize;
            let mut raft_index = 1 + next(5);
            let locs: Vec<EventLoc> = (0..len)
                .map(|pos| {
                    raft_index += next(3);
                    EventLoc::new(raft_index, pos % 100, EventKind::MessagePosted, 7)
                })
                .collect();
            let mut index = EventIndex::from_locs(locs);
            index.trim_below(1 + next(raft_index / 2 + 1));
            for at in 0..=raft_index + 2 {
                let expected =
                    index.base() as usize + index.kept().partition_point(|l| l.raft_index() <= at);
                assert_eq!(
                    index.partition_point(|l| l.raft_index() <= at),
                    expected,
                    "seed {seed}, {len} locations, raft index {at}"
                );
            }
        }
    }

    #[test]
    fn trims_are_deterministic_and_sparse() {
        let p = RetentionPolicy {
            retain_entries: Some(80),
            retain_bytes: None,
        };
        assert_eq!(p.trim_at(10), None);
        assert_eq!(p.trim_at(80), Some(1));
        assert_eq!(p.trim_at(81), None);
        assert_eq!(p.trim_at(90), Some(11));
        assert_eq!(RetentionPolicy::keep_all().trim_at(1 << 30), None);
    }

    #[test]
    fn the_byte_policy_keeps_about_its_bytes() {
        let p = RetentionPolicy {
            retain_entries: None,
            retain_bytes: Some(10_000),
        };
        let mut ledger = ByteLedger::default();
        let mut horizon = 0;
        for i in 1..=2_000u64 {
            if let Some(h) = p.note_entry(&mut ledger, i, 100) {
                assert!(h > horizon, "moves forward");
                horizon = h;
                // At least 100 entries of 100 bytes kept, less than a mark more.
                let kept = i + 1 - h;
                assert!((100..100 + MARK_EVERY_ENTRIES).contains(&kept), "{kept}");
            }
        }
        assert!(horizon > 1_800, "{horizon}");
        // The ledger round-trips, and a replica that restarts from it trims alike.
        let mut bytes = Vec::new();
        ledger.encode_into(&mut bytes);
        let mut back = ByteLedger::decode_from(&mut Reader::new("ledger", &bytes)).unwrap();
        assert_eq!(back, ledger);
        for i in 2_001..=2_200u64 {
            assert_eq!(
                p.note_entry(&mut back, i, 100),
                p.note_entry(&mut ledger, i, 100)
            );
        }
        // Small totals trim nothing.
        let mut fresh = ByteLedger::default();
        assert!((1..=500u64).all(|i| p.note_entry(&mut fresh, i, 10).is_none()));
    }

    /// Trimming drops the oldest index entries, keeps seqs, refuses what names a dropped
    /// seq, and round-trips through the checkpoint encoding byte-identically.
    #[test]
    fn trimmed_state_keeps_seqs_and_round_trips() {
        use crate::chat::command::{ChatKind, Command, Outcome, RefusalCode};
        use crate::chat::state::GroupState;

        let mut st = GroupState::new(3);
        let mut index = 0;
        let mut run = |st: &mut GroupState, cmd: Command| {
            index += 1;
            st.apply(&cmd, 1_000 + index, index, 0)
        };
        let user = match run(
            &mut st,
            Command::CreateUser {
                name: "ann".into(),
                login_token_hash: [1; 32],
            },
        ) {
            Outcome::UserCreated { user } => user,
            o => panic!("{o:?}"),
        };
        let chat = match run(
            &mut st,
            Command::CreateChat {
                creator: user,
                kind: ChatKind::Group,
                title: "t".into(),
                members: vec![],
            },
        ) {
            Outcome::Event { chat, .. } => chat,
            o => panic!("{o:?}"),
        };
        for cmid in 1..=20 {
            let o = run(
                &mut st,
                Command::Post {
                    chat,
                    sender: user,
                    client_message_id: cmid,
                    text: format!("m{cmid}"),
                    media: None,
                    reply_to: 0,
                },
            );
            assert!(matches!(o, Outcome::Event { .. }), "{o:?}");
        }
        // Raft index i holds seq i - 1 (index 1 the user, 2 the chat).
        let before = st.encode();
        st.trim_below(12);
        assert_ne!(st.encode(), before);
        assert_eq!(st.retained_from(), 12);
        assert_eq!(st.chat_first_seq(chat), Some(11));
        let events = st.chat_events(chat, 1, 100).expect("chat");
        assert_eq!(
            events.first().map(|e| e.0),
            Some(11),
            "starts at the first kept"
        );
        assert_eq!(events.last().map(|e| e.0), Some(21), "head unchanged");
        assert!(events.iter().all(|(s, l)| l.raft_index() == s + 1));
        // A delete of a dropped seq is refused (the same on every replica).
        match run(
            &mut st,
            Command::Delete {
                chat,
                sender: user,
                target: 5,
            },
        ) {
            Outcome::Refused(r) => assert_eq!(r.code, RefusalCode::NotFound, "{}", r.message),
            o => panic!("{o:?}"),
        }
        // The next post still gets head + 1.
        let o = run(
            &mut st,
            Command::Post {
                chat,
                sender: user,
                client_message_id: 99,
                text: "after".into(),
                media: None,
                reply_to: 0,
            },
        );
        assert!(matches!(o, Outcome::Event { seq: 22, .. }), "{o:?}");
        let bytes = st.encode();
        let back = GroupState::decode(&bytes).expect("decodes");
        assert_eq!(back, st);
        assert_eq!(back.encode(), bytes, "byte-identical");
    }
}
