//! The changed-chats feed of one group replica: which chats and which users' own logs
//! moved in each recently applied Raft entry.
//!
//! What it owns: a bounded in-memory ring of `(raft index, chat ids, user ids)`, one
//! element per applied entry that appended at least one event (entries that appended
//! nothing are covered without an element), filled by the state machine after it
//! applied an entry and before it publishes the entry's index on the applied watch. A
//! reader asks "what moved after index A?" and gets the union of the ids recorded after
//! A, or [`FeedRead::TooFarBehind`] when the ring no longer reaches back to A: the
//! reader then falls back to a full scan, so nothing is ever skipped.
//!
//! What it must not do: take part in the replicated state. It is derived per replica
//! from the apply outcomes (which are deterministic), is not in the checkpoint, and a
//! restarted replica (or one that installed a snapshot) starts with an empty ring that
//! covers nothing before its applied index. It does no I/O and reads no clock; recording
//! an entry is pushing a few ids.

use std::collections::{BTreeSet, VecDeque};

use crate::chat::{ChatId, Outcome, UserId};

/// Entries with news kept in the ring. Why: a watcher or remote poller that wakes after
/// every few applied entries needs a handful; 1,024 entries cover seconds of a busy
/// group (each entry batches many commands), and one that falls further behind rescans.
pub const FEED_ENTRIES_MAX: usize = 1024;
/// Chat and user ids kept in the ring, all entries together. Why: bounds its memory
/// (8 bytes per id, 128 KiB per group) whatever the batches hold: an entry of 4,096
/// posts to 4,096 different chats still leaves room for several such entries.
pub const FEED_IDS_MAX: usize = 16 * 1024;

/// What moved in one applied entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FeedEntry {
    index: u64,
    chats: Vec<ChatId>,
    users: Vec<UserId>,
}

/// The ids that moved in the entries after some index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The last applied index the answer covers (every entry up to it was recorded).
    /// Below the asked index when this replica has not applied that far yet.
    pub through: u64,
    /// Chats that got at least one event after the asked index.
    pub chats: BTreeSet<ChatId>,
    /// Users whose own log got at least one event after the asked index.
    pub users: BTreeSet<UserId>,
}

/// The answer to [`Feed::changes_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedRead {
    /// Every id that moved after the asked index.
    Changes(Changes),
    /// The ring starts after the asked index (it was trimmed, or this replica restarted
    /// or installed a snapshot since): scan every chat instead.
    TooFarBehind {
        /// The ring covers the entries after this index.
        covered_from: u64,
    },
}

/// The ring of one group replica (see the module docs).
#[derive(Debug)]
pub struct Feed {
    entries: VecDeque<FeedEntry>,
    /// Ids held by `entries`, for [`FEED_IDS_MAX`].
    ids: usize,
    /// Every applied entry after this index is recorded (as an element or as empty).
    covered_from: u64,
    /// The last applied index recorded.
    last: u64,
}

impl Feed {
    /// An empty ring for a replica that has applied up to `applied`.
    pub fn new(applied: u64) -> Feed {
        Feed {
            entries: VecDeque::new(),
            ids: 0,
            covered_from: applied,
            last: applied,
        }
    }

    /// Forgets everything: the replica's state jumped to `applied` (a snapshot).
    pub fn reset(&mut self, applied: u64) {
        *self = Feed::new(applied);
    }

    /// Records the outcomes of the entry at `index`, applied right after the last one.
    pub fn record(&mut self, index: u64, outcomes: &[Outcome]) {
        if index != self.last + 1 {
            // Not contiguous (cannot happen: apply checks it): cover nothing before.
            self.reset(index);
            return;
        }
        self.last = index;
        let mut chats = Vec::new();
        let mut users = Vec::new();
        for o in outcomes {
            match o {
                Outcome::Event {
                    chat,
                    deduplicated: false,
                    ..
                } => chats.push(*chat),
                Outcome::UserEvent { user, seq, .. } if *seq > 0 => users.push(*user),
                Outcome::ChatListsDelivered { users: moved } => users.extend_from_slice(moved),
                _ => {}
            }
        }
        if chats.is_empty() && users.is_empty() {
            return;
        }
        chats.sort_unstable();
        chats.dedup();
        users.sort_unstable();
        users.dedup();
        self.ids += chats.len() + users.len();
        self.entries.push_back(FeedEntry {
            index,
            chats,
            users,
        });
        while self.entries.len() > FEED_ENTRIES_MAX || self.ids > FEED_IDS_MAX {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.ids -= old.chats.len() + old.users.len();
            self.covered_from = old.index;
        }
    }

    /// The chats and users that moved in the entries after `after`.
    pub fn changes_after(&self, after: u64) -> FeedRead {
        if after < self.covered_from {
            return FeedRead::TooFarBehind {
                covered_from: self.covered_from,
            };
        }
        let mut changes = Changes {
            through: self.last,
            ..Changes::default()
        };
        let start = self.entries.partition_point(|e| e.index <= after);
        for e in self.entries.range(start..) {
            changes.chats.extend(e.chats.iter().copied());
            changes.users.extend(e.users.iter().copied());
        }
        FeedRead::Changes(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(chat: ChatId) -> Outcome {
        Outcome::Event {
            chat,
            seq: 1,
            timestamp_ms: 0,
            deduplicated: false,
        }
    }

    #[test]
    fn changes_after_unions_the_entries_after_the_index() {
        let mut f = Feed::new(10);
        f.record(11, &[post(1), post(1), post(2)]);
        f.record(12, &[]);
        f.record(
            13,
            &[
                post(3),
                Outcome::UserEvent {
                    user: 7,
                    seq: 4,
                    read_seq: 0,
                },
                Outcome::UserEvent {
                    user: 8,
                    seq: 0,
                    read_seq: 0,
                },
                Outcome::ChatListsDelivered { users: vec![5, 7] },
                Outcome::Event {
                    chat: 9,
                    seq: 1,
                    timestamp_ms: 0,
                    deduplicated: true,
                },
            ],
        );
        let FeedRead::Changes(c) = f.changes_after(10) else {
            panic!("covered")
        };
        assert_eq!(c.through, 13);
        assert_eq!(c.chats.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(c.users.into_iter().collect::<Vec<_>>(), vec![5, 7]);
        let FeedRead::Changes(c) = f.changes_after(12) else {
            panic!("covered")
        };
        assert_eq!(c.chats.into_iter().collect::<Vec<_>>(), vec![3]);
        let FeedRead::Changes(c) = f.changes_after(13) else {
            panic!("covered")
        };
        assert!(c.chats.is_empty() && c.users.is_empty());
        // A reader ahead of this replica gets nothing, and `through` says how far it is.
        let FeedRead::Changes(c) = f.changes_after(20) else {
            panic!("covered")
        };
        assert_eq!(c.through, 13);
        assert!(c.chats.is_empty());
        assert_eq!(
            f.changes_after(9),
            FeedRead::TooFarBehind { covered_from: 10 }
        );
    }

    /// The feed and `GroupState::chat_seq_after` together: what moved after index A is
    /// exactly the events applied in entries after A, whichever replica answers.
    #[test]
    fn seq_ranges_follow_raft_indexes() {
        use crate::chat::{ChatKind, Command, GroupState};
        let mut st = GroupState::new(1);
        let mut feed = Feed::new(0);
        let mut index = 0;
        let mut apply = |st: &mut GroupState, feed: &mut Feed, cmds: Vec<Command>| {
            index += 1;
            let outcomes: Vec<Outcome> = cmds
                .iter()
                .enumerate()
                .map(|(pos, c)| st.apply(c, 1_000, index, pos))
                .collect();
            feed.record(index, &outcomes);
            outcomes
        };
        let Outcome::UserCreated { user } = apply(
            &mut st,
            &mut feed,
            vec![Command::CreateUser {
                name: "ann".into(),
                login_token_hash: [1; 32],
            }],
        )[0] else {
            panic!("user")
        };
        let Outcome::Event { chat, .. } = apply(
            &mut st,
            &mut feed,
            vec![Command::CreateChat {
                creator: user,
                kind: ChatKind::Group,
                title: "t".into(),
                members: vec![],
            }],
        )[0] else {
            panic!("chat")
        };
        let post = |cmid| Command::Post {
            chat,
            sender: user,
            client_message_id: cmid,
            text: "hi".into(),
            media: None,
            reply_to: 0,
        };
        // Entry 3: seqs 2..=4; entry 4: a duplicate only; entry 5: seq 5.
        apply(&mut st, &mut feed, vec![post(1), post(2), post(3)]);
        apply(&mut st, &mut feed, vec![post(1)]);
        apply(&mut st, &mut feed, vec![post(4)]);
        assert_eq!(st.chat_seq_after(chat, 2), Some(2));
        assert_eq!(st.chat_seq_after(chat, 3), Some(5));
        assert_eq!(st.chat_seq_after(chat, 4), Some(5));
        assert_eq!(st.chat_seq_after(chat, 5), Some(6), "head + 1");
        assert_eq!(st.chat_seq_after(chat + 1, 0), None);
        let FeedRead::Changes(c) = feed.changes_after(3) else {
            panic!("covered")
        };
        assert_eq!(c.chats.into_iter().collect::<Vec<_>>(), vec![chat]);
        assert_eq!(
            feed.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![2, 3, 5],
            "a new user and a duplicate post move no chat"
        );
        let FeedRead::Changes(c) = feed.changes_after(2) else {
            panic!("covered")
        };
        assert_eq!(c.through, 5);
    }

    #[test]
    fn trimming_the_ring_answers_too_far_behind_never_a_partial_set() {
        let mut f = Feed::new(0);
        for i in 1..=(FEED_ENTRIES_MAX as u64 + 5) {
            f.record(i, &[post(i)]);
        }
        assert_eq!(f.entries.len(), FEED_ENTRIES_MAX);
        assert_eq!(
            f.changes_after(4),
            FeedRead::TooFarBehind { covered_from: 5 }
        );
        let FeedRead::Changes(c) = f.changes_after(5) else {
            panic!("covered")
        };
        assert_eq!(c.chats.len(), FEED_ENTRIES_MAX);
        // The id bound trims too.
        let mut f = Feed::new(0);
        let wide: Vec<Outcome> = (1..=6000).map(post).collect();
        for i in 1..=3 {
            f.record(i, &wide);
        }
        assert!(f.ids <= FEED_IDS_MAX);
        assert_eq!(
            f.changes_after(0),
            FeedRead::TooFarBehind { covered_from: 1 }
        );
        // A gap in the indexes (a snapshot) covers nothing before it.
        f.record(10, &[post(1)]);
        assert_eq!(
            f.changes_after(9),
            FeedRead::TooFarBehind { covered_from: 10 }
        );
    }
}
