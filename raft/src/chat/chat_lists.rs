//! The chat-list outbox: exactly-once, in-order delivery of membership changes from a
//! chat's group to each member's own group.
//!
//! A user's list of chats lives in the user's group (their own log, which sync and every
//! device read); a chat's members live in the chat's group. A membership change is
//! decided in the chat's group, so its effect on the user's list is a write to another
//! group. What it owns: both halves of that hand-over as replicated state.
//!
//! - **Outbox** (in the chat's group). Applying a change of membership (`CreateChat`,
//!   `Invite`, `Join`, `RemoveMember`, `Leave`, `Ban`) appends one record per affected
//!   user, numbered `1, 2, …` per group, in the same apply as the change itself: there is
//!   no moment where the chat changed and the record is missing, whatever crashes.
//! - **Delivery** (in the user's group). `Command::ChatListDelivery { source, records }`
//!   applies each record whose number is above the highest one applied from `source`,
//!   in order, and skips the others. A delivery repeated after a crash, a leader change
//!   or a lost answer therefore changes nothing twice, and an add followed by a remove
//!   never ends reversed.
//! - **Acknowledgement** (back in the chat's group). `Command::ChatListAcked { upto }`
//!   drops the records up to `upto` once they are delivered.
//!
//! The leader of the chat's group drives it (`crate::chat_list_drain`, the I/O side): read
//! the pending records, propose the deliveries (one command per destination group, in
//! record order), then the acknowledgement. What it must not do: read clocks or do I/O
//! (this file is rules and bytes only), or let the outbox grow without bound — a change
//! that would overflow [`OUTBOX_RECORDS_MAX`] is refused, and nothing changes.
//!
//! A delivery holds at most one record per user ([`DELIVERY_RECORDS_MAX`] in all), so
//! that the user-log event it appends for a user names exactly one chat: a reader that
//! finds the event at `(raft index, position)` takes the record of that user.
//!
//! Checkpoint bytes, little-endian, after the media part of `GroupState`:
//!
//! ```text
//! next_no u64 | acked u64 | records u64 × ( no u64 | user u64 | chat u64 | added u8 )
//! delivered u64 × ( source group u64 | highest no applied u64 )
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::chat::command::{Outcome, RefusalCode};
use crate::chat::{ChatId, UserId};
use crate::codec::{DecodeError, Reader};
use crate::types::GroupId;

/// Records an outbox may hold before membership changes in its group are refused.
/// Why: the outbox is in memory and in every checkpoint (25 bytes a record); it only
/// grows while a destination group cannot be written (no leader), and a refusal the
/// client retries is better than a state that grows until the node runs out of memory.
/// 1,000,000 records is ~25 MB.
pub const OUTBOX_RECORDS_MAX: usize = 1_000_000;

/// Records in one `ChatListDelivery` command. Why: one Raft entry stays small (33 bytes
/// a record, ~8 KiB), and a round delivers to many destination groups at once.
pub const DELIVERY_RECORDS_MAX: usize = 256;

/// Source groups a delivered-marker map may hold (one per group of the cluster).
const SOURCES_MAX: usize = 1 << 16;

/// One membership change on its way to the user's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatListRecord {
    /// Its number in the source group's outbox (1, 2, …).
    pub no: u64,
    /// The user whose list changes.
    pub user: UserId,
    /// The chat.
    pub chat: ChatId,
    /// Added to the list (true) or removed from it.
    pub added: bool,
}

/// Bytes of one record inside a command or a checkpoint.
pub const RECORD_BYTES: usize = 25;

impl ChatListRecord {
    /// Appends the record's bytes.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.no.to_le_bytes());
        out.extend_from_slice(&self.user.to_le_bytes());
        out.extend_from_slice(&self.chat.to_le_bytes());
        out.push(u8::from(self.added));
    }

    /// Reads one record.
    pub fn decode(r: &mut Reader<'_>) -> Result<ChatListRecord, DecodeError> {
        Ok(ChatListRecord {
            no: r.u64()?,
            user: r.u64()?,
            chat: r.u64()?,
            added: r.bool()?,
        })
    }
}

/// The chat-list part of a group's state (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatLists {
    /// The number of the last record appended (0 before any).
    next_no: u64,
    /// Every record up to this number was delivered and dropped.
    acked: u64,
    /// Undelivered records, in number order.
    records: VecDeque<ChatListRecord>,
    /// Per source group, the highest record number applied here.
    delivered: BTreeMap<GroupId, u64>,
}

impl ChatLists {
    /// Whether `n` more records fit in the outbox.
    pub fn has_room(&self, n: usize) -> bool {
        self.records.len().saturating_add(n) <= OUTBOX_RECORDS_MAX
    }

    /// The refusal of a membership change when the outbox is full.
    pub fn full_refusal(&self) -> Outcome {
        Outcome::refused(
            RefusalCode::Conflict,
            format!(
                "this group's chat-list outbox holds {OUTBOX_RECORDS_MAX} undelivered \
                 changes (a member's group has no leader); retry later"
            ),
        )
    }

    /// Appends a record (the caller checked [`ChatLists::has_room`] before changing the
    /// chat, so the change and its record are all or nothing).
    pub fn push(&mut self, user: UserId, chat: ChatId, added: bool) {
        self.next_no += 1;
        self.records.push_back(ChatListRecord {
            no: self.next_no,
            user,
            chat,
            added,
        });
    }

    /// The number of the last record appended (0 before any).
    pub fn next_no(&self) -> u64 {
        self.next_no
    }

    /// Every record up to this number is delivered.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Undelivered records.
    pub fn pending(&self) -> usize {
        self.records.len()
    }

    /// Up to `max` undelivered records, oldest first.
    pub fn oldest(&self, max: usize) -> Vec<ChatListRecord> {
        self.records.iter().take(max).copied().collect()
    }

    /// Applies `ChatListAcked { upto }`: drops the records up to `upto`. Returns how
    /// many were dropped. An acknowledgement of records never appended is refused.
    pub fn apply_acked(&mut self, upto: u64) -> Outcome {
        if upto > self.next_no {
            return Outcome::refused(
                RefusalCode::BadRequest,
                format!(
                    "acknowledges chat-list record {upto}, the outbox ends at {}",
                    self.next_no
                ),
            );
        }
        let mut dropped = 0;
        while self.records.front().is_some_and(|r| r.no <= upto) {
            self.records.pop_front();
            dropped += 1;
        }
        self.acked = self.acked.max(upto);
        Outcome::ChatLists { applied: dropped }
    }

    /// Whether record `no` from `source` is new here; if so, marks it applied. Records
    /// of one source arrive in number order (the driver sends them so), so a number at
    /// or below the mark is a repeat.
    pub fn take_delivery(&mut self, source: GroupId, no: u64) -> bool {
        let mark = self.delivered.entry(source).or_insert(0);
        if no <= *mark {
            return false;
        }
        *mark = no;
        true
    }

    /// The highest record number from `source` applied here.
    pub fn delivered_from(&self, source: GroupId) -> u64 {
        self.delivered.get(&source).copied().unwrap_or(0)
    }

    /// Appends the checkpoint bytes (module docs).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.next_no.to_le_bytes());
        out.extend_from_slice(&self.acked.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        for r in &self.records {
            r.encode_into(out);
        }
        out.extend_from_slice(&(self.delivered.len() as u64).to_le_bytes());
        for (source, no) in &self.delivered {
            out.extend_from_slice(&source.to_le_bytes());
            out.extend_from_slice(&no.to_le_bytes());
        }
    }

    /// Reads what [`ChatLists::encode_into`] wrote, checking the records are in order.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<ChatLists, DecodeError> {
        let mut s = ChatLists {
            next_no: r.u64()?,
            acked: r.u64()?,
            ..ChatLists::default()
        };
        let mut last = s.acked;
        for _ in 0..r.u64_count(RECORD_BYTES, OUTBOX_RECORDS_MAX)? {
            let rec = ChatListRecord::decode(r)?;
            if rec.no <= last || rec.no > s.next_no {
                return Err(r.error(format!(
                    "chat-list record {} out of order (after {last}, outbox ends at {})",
                    rec.no, s.next_no
                )));
            }
            last = rec.no;
            s.records.push_back(rec);
        }
        for _ in 0..r.u64_count(16, SOURCES_MAX)? {
            let source = r.u64()?;
            let no = r.u64()?;
            s.delivered.insert(source, no);
        }
        Ok(s)
    }
}

/// The records of one delivery round for each destination: at most
/// [`DELIVERY_RECORDS_MAX`] per command and at most one per user per command, in record
/// order; `group_of_user` names each record's destination. A round stops at the first
/// record that would break the order of a destination (its user already has a record in
/// the command being filled), so what remains goes in the next round.
pub fn plan_round(
    records: &[ChatListRecord],
    group_of_user: impl Fn(UserId) -> GroupId,
) -> BTreeMap<GroupId, Vec<ChatListRecord>> {
    let mut out: BTreeMap<GroupId, Vec<ChatListRecord>> = BTreeMap::new();
    let mut users: BTreeMap<GroupId, BTreeSet<UserId>> = BTreeMap::new();
    for r in records {
        let g = group_of_user(r.user);
        let list = out.entry(g).or_default();
        let seen = users.entry(g).or_default();
        if list.len() >= DELIVERY_RECORDS_MAX || seen.contains(&r.user) {
            // Later records of this destination must wait for this one's round; so must
            // every later record (the acknowledgement covers a prefix).
            break;
        }
        seen.insert(r.user);
        list.push(*r);
    }
    out.retain(|_, l| !l.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(no: u64, user: UserId, chat: ChatId, added: bool) -> ChatListRecord {
        ChatListRecord {
            no,
            user,
            chat,
            added,
        }
    }

    #[test]
    fn acknowledgement_drops_a_prefix_and_refuses_the_future() {
        let mut s = ChatLists::default();
        s.push(1, 10, true);
        s.push(2, 10, true);
        s.push(1, 10, false);
        assert_eq!(s.next_no(), 3);
        assert_eq!(s.apply_acked(2), Outcome::ChatLists { applied: 2 });
        assert_eq!(s.oldest(10), vec![rec(3, 1, 10, false)]);
        assert_eq!(s.apply_acked(2), Outcome::ChatLists { applied: 0 });
        assert!(matches!(s.apply_acked(4), Outcome::Refused(_)));
        assert_eq!(s.acked(), 2);
    }

    #[test]
    fn a_repeated_or_older_delivery_is_skipped_per_source() {
        let mut s = ChatLists::default();
        assert!(s.take_delivery(5, 1));
        assert!(s.take_delivery(5, 3));
        assert!(!s.take_delivery(5, 3));
        assert!(!s.take_delivery(5, 2));
        assert!(s.take_delivery(6, 1));
        assert_eq!(s.delivered_from(5), 3);
        assert_eq!(s.delivered_from(7), 0);
    }

    #[test]
    fn checkpoint_bytes_round_trip_and_reject_disorder() {
        let mut s = ChatLists::default();
        for i in 0..5 {
            s.push(i, 100 + i, i % 2 == 0);
        }
        s.apply_acked(2);
        s.take_delivery(3, 9);
        let mut bytes = Vec::new();
        s.encode_into(&mut bytes);
        let mut r = Reader::new("chat lists", &bytes);
        assert_eq!(ChatLists::decode_from(&mut r).unwrap(), s);
        assert_eq!(r.remaining(), 0);
        // Swap the two remaining records' numbers: out of order.
        let first = 8 + 8 + 8;
        let second = first + RECORD_BYTES;
        let mut bad = bytes.clone();
        bad[first..first + 8].copy_from_slice(&5u64.to_le_bytes());
        bad[second..second + 8].copy_from_slice(&4u64.to_le_bytes());
        assert!(ChatLists::decode_from(&mut Reader::new("chat lists", &bad)).is_err());
    }

    #[test]
    fn a_round_keeps_one_record_per_user_and_stops_at_the_first_repeat() {
        let records = vec![
            rec(1, 1, 50, true),
            rec(2, 2, 50, true),
            rec(3, 1, 51, true), // user 1 again: the round stops here
            rec(4, 3, 50, true),
        ];
        // Users 1 and 3 in group 1, user 2 in group 2.
        let plan = plan_round(&records, |u| if u == 2 { 2 } else { 1 });
        assert_eq!(plan[&1], vec![rec(1, 1, 50, true)]);
        assert_eq!(plan[&2], vec![rec(2, 2, 50, true)]);
        assert_eq!(plan.len(), 2);
        let many: Vec<_> = (1..=600).map(|i| rec(i, i, 9, true)).collect();
        let plan = plan_round(&many, |_| 1);
        assert_eq!(plan[&1].len(), DELIVERY_RECORDS_MAX);
        assert_eq!(plan[&1].last().unwrap().no, DELIVERY_RECORDS_MAX as u64);
    }
}
