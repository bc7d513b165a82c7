//! What moved in a local group replica after a Raft index, for a set of users: the one
//! computation behind both the local watchers and the answers to remote pollers.
//!
//! What it owns: turning "entries `(after, through]`" into per-chat seq ranges and
//! recipients, and per-user own-log seq ranges. The chats and users to look at come from
//! the replica's changed-chats feed (`chatlog_raft::feed`); when the feed no longer
//! reaches back to `after`, every chat of the group is looked at instead (a rescan: the
//! same answer, O(chats) instead of O(changes)). The ranges come from the Raft index
//! each event was applied at (a binary search per chat), so the answer is the same on
//! every replica: a cursor taken from one replica is good on another.
//!
//! What it must not do: read the log (callers read the events of the ranges once), or
//! hold the state lock across an await.

use std::collections::{HashMap, HashSet};

use chatlog_raft::chat::{ChatId, UserId, group_of, make_id};
use chatlog_raft::feed::FeedRead;
use chatlog_raft::node::Group;

use super::{Hub, OnlineUser};

/// Whose news is wanted.
pub(super) enum Audience<'a> {
    /// The users online on this node (the local watcher). With push notifications
    /// (`--push-webhook`) every chat that moved is answered, with or without recipients:
    /// the notifier looks at all of them. Without, only chats with a recipient.
    OnlineHere,
    /// Users online on a polling node. Only chats one of them is a member of are
    /// answered.
    Users(&'a HashSet<UserId>),
}

/// New events of one chat.
#[derive(Debug)]
pub(super) struct ChatNews {
    pub chat: ChatId,
    /// First new seq.
    pub from: u64,
    /// Last new seq (`from..=to` is not empty).
    pub to: u64,
    /// The audience's users who are members of the chat.
    pub recipients: Vec<UserId>,
}

/// New entries of one user's own log.
#[derive(Debug)]
pub(super) struct UserNews {
    pub user: UserId,
    pub from: u64,
    pub to: u64,
}

/// What moved in the entries `(after, through]`.
#[derive(Debug, Default)]
pub(super) struct News {
    /// The last entry covered; never below the asked `after`.
    pub through: u64,
    pub chats: Vec<ChatNews>,
    pub users: Vec<UserNews>,
    /// The feed did not reach back to `after`: every chat was looked at.
    pub rescanned: bool,
}

impl News {
    /// Events (chat and user) the news names.
    pub fn events(&self) -> u64 {
        self.chats.iter().map(|c| c.to + 1 - c.from).sum::<u64>()
            + self.users.iter().map(|u| u.to + 1 - u.from).sum::<u64>()
    }
}

/// The audience as a set, whichever it is.
enum Set<'a> {
    Online(&'a HashMap<UserId, OnlineUser>),
    Given(&'a HashSet<UserId>),
}

impl Set<'_> {
    fn len(&self) -> usize {
        match self {
            Set::Online(m) => m.len(),
            Set::Given(s) => s.len(),
        }
    }
    fn contains(&self, u: UserId) -> bool {
        match self {
            Set::Online(m) => m.contains_key(&u),
            Set::Given(s) => s.contains(&u),
        }
    }
    fn users(&self) -> Box<dyn Iterator<Item = UserId> + '_> {
        match self {
            Set::Online(m) => Box::new(m.keys().copied()),
            Set::Given(s) => Box::new(s.iter().copied()),
        }
    }
}

impl Hub {
    /// What moved in `group` in the entries after `after`, up to at most `through_max`,
    /// for `audience` (see the module docs).
    pub(super) fn news(
        &self,
        group: &Group,
        after: u64,
        through_max: u64,
        audience: Audience<'_>,
    ) -> News {
        let feed = group.shared().changes_after(after);
        // Lock order: group state, then the registry.
        let st = group.shared().read();
        let (through, chats, users, rescanned) = match feed {
            FeedRead::Changes(c) => (c.through, Some(c.chats), Some(c.users), false),
            // The state read now holds everything applied up to the watch's value.
            FeedRead::TooFarBehind { .. } => (*group.shared().applied().borrow(), None, None, true),
        };
        let through = through.min(through_max);
        if through <= after {
            return News {
                through: after,
                ..News::default()
            };
        }
        let online;
        let (set, every_moved_chat) = match audience {
            Audience::OnlineHere => {
                online = self.online();
                (Set::Online(&online.users), self.notifier.get().is_some())
            }
            Audience::Users(s) => (Set::Given(s), false),
        };
        let mut news = News {
            through,
            rescanned,
            ..News::default()
        };
        let all_chats = || {
            (1u64..)
                .map(|local| make_id(group.id(), local))
                .take_while(|chat| st.head_seq(*chat).is_some())
                .collect::<Vec<_>>()
        };
        // Nobody to answer and no chat wanted without recipients: no chat is looked at
        // (the watcher of a node with nobody online, or of a busy group whose members
        // are all elsewhere, otherwise searched two seqs per moved chat, per wake-up).
        let chats: Vec<ChatId> = if set.len() == 0 && !every_moved_chat {
            Vec::new()
        } else {
            chats.map_or_else(all_chats, |c| c.into_iter().collect())
        };
        for chat in chats {
            let Some(view) = st.chat(chat) else { continue };
            // The recipients first: a chat nobody here receives is skipped before its
            // seqs are searched.
            let mut recipients = Vec::new();
            if (set.len() as u64) < view.member_count {
                recipients.extend(set.users().filter(|u| st.role(chat, *u).is_some()));
            } else if let Some((members, _)) = st.members(chat, 0, usize::MAX) {
                recipients.extend(members.iter().map(|m| m.user).filter(|u| set.contains(*u)));
            }
            if recipients.is_empty() && !every_moved_chat {
                continue;
            }
            let (Some(from), Some(next)) = (
                st.chat_seq_after(chat, after),
                st.chat_seq_after(chat, through),
            ) else {
                continue;
            };
            if from >= next {
                continue;
            }
            news.chats.push(ChatNews {
                chat,
                from,
                to: next - 1,
                recipients,
            });
        }
        let in_group = |u: &UserId| group_of(*u) == group.id() && set.contains(*u);
        let users: Vec<UserId> = match users {
            Some(moved) => moved.into_iter().filter(in_group).collect(),
            None => set.users().filter(in_group).collect(),
        };
        for user in users {
            let (Some(from), Some(next)) = (
                st.user_seq_after(user, after),
                st.user_seq_after(user, through),
            ) else {
                continue;
            };
            if from < next {
                news.users.push(UserNews {
                    user,
                    from,
                    to: next - 1,
                });
            }
        }
        news
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use chatlog_raft::chat::{ChatKind, Command, Outcome};
    use chatlog_raft::feed::FEED_ENTRIES_MAX;
    use chatlog_raft::node::{NoPeers, Node, NodeConfig};

    use super::*;

    async fn propose(group: &Group, cmd: Command) -> Outcome {
        group.propose(cmd).await.expect("proposed")
    }

    /// A cursor older than the feed reaches gets the answer by a rescan, with the same
    /// ranges the feed gives a recent cursor: nothing is skipped either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cursor_that_fell_off_the_feed_rescans_and_misses_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let node = Node::start(
            NodeConfig::single(dir.path(), 1),
            |_| NoPeers,
            Default::default(),
        )
        .await
        .expect("node");
        node.wait_for_leaders(Duration::from_secs(30))
            .await
            .expect("leader");
        let node = Arc::new(node);
        let hub = Hub::start(Arc::clone(&node));
        let group = node.group(1).expect("group 1");
        let mut users = Vec::new();
        for name in ["ann", "bob"] {
            let created = Command::CreateUser {
                name: name.into(),
                login_token_hash: [1; 32],
            };
            let Outcome::UserCreated { user } = propose(&group, created).await else {
                panic!("user created");
            };
            users.push(user);
        }
        let (ann, bob) = (users[0], users[1]);
        let mut chats = Vec::new();
        for members in [vec![bob], vec![]] {
            let create = Command::CreateChat {
                creator: ann,
                kind: ChatKind::Group,
                title: "t".into(),
                members,
            };
            let Outcome::Event { chat, .. } = propose(&group, create).await else {
                panic!("chat created");
            };
            chats.push(chat);
        }
        let (with_bob, without_bob) = (chats[0], chats[1]);
        let start = *group.shared().applied().borrow();
        // One post per entry (proposed one after the other): more entries than the feed
        // keeps.
        let posts = FEED_ENTRIES_MAX as u64 + 10;
        for i in 0..posts {
            let post = Command::Post {
                chat: if i % 2 == 0 { with_bob } else { without_bob },
                sender: ann,
                client_message_id: i + 1,
                text: format!("post {i}"),
                media: None,
                reply_to: 0,
            };
            assert!(matches!(propose(&group, post).await, Outcome::Event { .. }));
        }
        let audience: HashSet<UserId> = [bob].into();
        let old = hub.news(&group, start, u64::MAX, Audience::Users(&audience));
        assert!(old.rescanned, "the feed keeps {FEED_ENTRIES_MAX} entries");
        let head = posts.div_ceil(2) + 1;
        assert_eq!(old.chats.len(), 1, "only the chat bob is in: {old:?}");
        let c = &old.chats[0];
        assert_eq!((c.chat, c.from, c.to), (with_bob, 2, head));
        assert_eq!(c.recipients, vec![bob]);
        // A recent cursor is answered from the feed, by the same rule.
        let mid = old.through - 10;
        let recent = hub.news(&group, mid, u64::MAX, Audience::Users(&audience));
        assert!(!recent.rescanned);
        assert_eq!(recent.through, old.through);
        let c = &recent.chats[0];
        let from = group
            .shared()
            .read()
            .chat_seq_after(with_bob, mid)
            .expect("chat");
        assert_eq!((c.chat, c.from, c.to), (with_bob, from, head));
        assert_eq!(
            head + 1 - from,
            5,
            "10 entries, every other one to this chat"
        );
        // The local watcher's audience, nobody online and no push notifications: no
        // chat is named (nobody to push to), but the cursor still moves on.
        let local = hub.news(&group, mid, u64::MAX, Audience::OnlineHere);
        assert!(local.chats.is_empty(), "{local:?}");
        assert_eq!(local.through, old.through);
        // With push notifications the same audience sees both chats move (the notifier
        // looks at members without an online session). Its webhook is never called:
        // nothing is posted once it is set, and its collapse window outlasts the test.
        let config = crate::notify::NotifyConfig::parse(
            "http://127.0.0.1:9/hook",
            None,
            Duration::from_secs(60),
        )
        .expect("webhook url");
        hub.set_notifier(crate::notify::Notifier::start(Arc::clone(&node), config));
        let local = hub.news(&group, mid, u64::MAX, Audience::OnlineHere);
        assert_eq!(local.chats.len(), 2, "{local:?}");
        assert!(local.chats.iter().all(|c| c.recipients.is_empty()));
        drop(hub);
    }
}
