//! Typing indicators and presence: live state that goes through the hub and is never
//! stored (nothing of it reaches the Raft log or the disk).
//!
//! What it owns: pushing `Typing` to the online sessions of a chat's other members, the
//! last time each user was seen online on this node, and which connections follow whose
//! presence (a connection asks with `get_presence` and then gets a `Presence` push when
//! one of those users comes online or goes offline). What it must not do: decide who may
//! type (the service checks membership first) or keep anything across a restart.
//!
//! Limits of this slice: presence pushes and typing are per node: typing reaches the
//! members online on the typist's node, and a user coming online on another node is not
//! pushed to followers here (live chat and user events cross nodes: `remote.rs`; these
//! do not). `get_presence`'s online flag is cluster-wide (`online.rs`); last-seen times
//! are this node's.

use std::collections::{HashMap, HashSet};

use chatlog_raft::chat::{ChatId, UserId};
use chatlog_raft::node::Group;
use chatlog_wire::proto::v1::{self, push};

use super::Hub;
use crate::gateway::{PushSender, SharedPush};

/// How long a client shows "typing" unless the typist repeats it. Why: Telegram's
/// clients use about 6 s; a typist whose connection dies is not shown typing for ever.
pub const TYPING_EXPIRES_MS: u32 = 6_000;
/// Users one connection may follow the presence of; asking about more forgets the
/// oldest. Why: a contact list's worth, and it bounds the follower map.
pub const PRESENCE_WATCH_MAX: usize = 1_000;
/// Users whose last-seen time is remembered; beyond, the oldest tenth is forgotten.
/// Why: one entry per user who was ever online on this node since it started.
pub const LAST_SEEN_MAX: usize = 1_000_000;

/// Presence bookkeeping of one node.
#[derive(Debug, Default)]
pub(super) struct Presence {
    /// When each user who went offline was last online (ms).
    last_seen: HashMap<UserId, u64>,
    /// Who follows whom: user → (connection id → its push sender).
    followers: HashMap<UserId, HashMap<u64, PushSender>>,
    /// What each connection follows, oldest first.
    following: HashMap<u64, Vec<UserId>>,
}

impl Presence {
    /// The pushes to send because `user` came online (`online`) or went offline.
    fn changed(
        &mut self,
        user: UserId,
        online: bool,
        now_ms: u64,
    ) -> Vec<(PushSender, v1::Presence)> {
        if online {
            self.last_seen.remove(&user);
        } else {
            if self.last_seen.len() >= LAST_SEEN_MAX {
                let mut times: Vec<u64> = self.last_seen.values().copied().collect();
                let cut = times.len() / 10;
                let (_, oldest_kept, _) = times.select_nth_unstable(cut);
                let oldest_kept = *oldest_kept;
                self.last_seen.retain(|_, t| *t >= oldest_kept);
            }
            self.last_seen.insert(user, now_ms);
        }
        let state = v1::Presence {
            user_id: user,
            online,
            last_seen_ms: if online { 0 } else { now_ms },
        };
        self.followers
            .get(&user)
            .map(|f| f.values().map(|p| (p.clone(), state)).collect())
            .unwrap_or_default()
    }

    /// `connection` follows `users` from now on (the newest [`PRESENCE_WATCH_MAX`]).
    fn follow(&mut self, connection: u64, pushes: &PushSender, users: &[UserId]) {
        let list = self.following.entry(connection).or_default();
        for u in users {
            if !list.contains(u) {
                list.push(*u);
            }
            self.followers
                .entry(*u)
                .or_default()
                .insert(connection, pushes.clone());
        }
        if list.len() > PRESENCE_WATCH_MAX {
            let dropped: Vec<UserId> = list.drain(..list.len() - PRESENCE_WATCH_MAX).collect();
            for u in dropped {
                self.unfollow_one(connection, u);
            }
        }
    }

    fn unfollow_one(&mut self, connection: u64, user: UserId) {
        if let Some(f) = self.followers.get_mut(&user) {
            f.remove(&connection);
            if f.is_empty() {
                self.followers.remove(&user);
            }
        }
    }

    /// The connection closed.
    fn forget(&mut self, connection: u64) {
        for u in self.following.remove(&connection).unwrap_or_default() {
            self.unfollow_one(connection, u);
        }
    }
}

impl Hub {
    fn presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called after `user`'s first connection registered (`online`) or its last one went.
    pub(super) fn presence_changed(&self, user: UserId, online: bool) {
        let pushes = self
            .presence()
            .changed(user, online, chatlog_raft::clock::now_ms());
        for (to, state) in pushes {
            // A full queue cuts that connection off (slow reader); nothing else waits.
            let _ = to.push(0, push::Kind::Presence(state));
        }
    }

    /// Called when a connection closed.
    pub(super) fn presence_forget(&self, connection_id: u64) {
        self.presence().forget(connection_id);
    }

    /// Pushes `Typing` for `user` in `chat` to the online sessions of the chat's other
    /// members on this node. The caller checked that `user` may post there.
    pub fn typing(&self, group: &Group, chat: ChatId, user: UserId, typing: bool) {
        let Some(frame) = SharedPush::new(push::Kind::Typing(v1::Typing {
            chat_id: chat,
            user_id: user,
            typing,
            expires_in_ms: if typing { TYPING_EXPIRES_MS } else { 0 },
        })) else {
            return;
        };
        for to in self.recipients_except(group, chat, user) {
            let _ = to.push_shared(&frame);
        }
    }

    /// The presence of `users` as this node knows it; `connection_id` follows them from
    /// now on (see [`PRESENCE_WATCH_MAX`]).
    pub fn get_presence(
        &self,
        connection_id: u64,
        pushes: &PushSender,
        users: &[UserId],
    ) -> Vec<v1::Presence> {
        let online: HashSet<UserId> = users
            .iter()
            .copied()
            .filter(|u| self.is_online(*u))
            .collect();
        let mut p = self.presence();
        p.follow(connection_id, pushes, users);
        users
            .iter()
            .map(|u| v1::Presence {
                user_id: *u,
                online: online.contains(u),
                last_seen_ms: if online.contains(u) {
                    0
                } else {
                    p.last_seen.get(u).copied().unwrap_or(0)
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_is_bounded_and_cleared_when_online() {
        let mut p = Presence::default();
        for u in 0..LAST_SEEN_MAX as u64 {
            p.last_seen.insert(u, u);
        }
        let _ = p.changed(u64::MAX, false, u64::MAX);
        assert!(p.last_seen.len() <= LAST_SEEN_MAX, "{}", p.last_seen.len());
        assert!(p.last_seen.contains_key(&u64::MAX), "the newest is kept");
        assert!(!p.last_seen.contains_key(&0), "the oldest went");
        let _ = p.changed(u64::MAX, true, 0);
        assert!(
            !p.last_seen.contains_key(&u64::MAX),
            "online users have no last-seen"
        );
    }
}
