//! Typing indicators and presence: live state that goes through the hub and is never
//! stored (nothing of it reaches the Raft log or the disk).
//!
//! What it owns: pushing `Typing` to the online sessions of a chat's other members, the
//! last time each user was seen online on this node, and which connections follow whose
//! presence (a connection asks with `get_presence` and then gets a `Presence` push when
//! one of those users comes online or goes offline). What it must not do: decide who may
//! type (the service checks membership first) or keep anything across a restart.
//!
//! Typing crosses nodes: the node that accepts a `typing` request (one with a replica of
//! the chat's group; others forward it there, `service/forward.rs`) pushes it to the
//! members online on it and relays it (`typing_request`, a `TypingRelay`) to each other
//! node whose online list (`online.rs`) holds members, naming them; that node pushes it
//! to their sessions. Limits of this slice: presence pushes are per node (a user coming
//! online on another node is not pushed to followers here); `get_presence`'s online
//! flag is cluster-wide (`online.rs`); last-seen times are this node's.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use chatlog_raft::NodeId;
use chatlog_raft::chat::{ChatId, UserId};
use chatlog_raft::node::Group;
use chatlog_wire::proto::node::v1::TypingRelay;
use chatlog_wire::proto::v1::{self, push};
use prost::Message;

use super::{FANOUT_POLL_USERS_MAX, Hub, ONLINE_REMOTE_EXPIRY, members_among};
use crate::gateway::{PushSender, SharedPush};

/// How long a client shows "typing" unless the typist repeats it. Why: Telegram's
/// clients use about 6 s; a typist whose connection dies is not shown typing for ever.
pub const TYPING_EXPIRES_MS: u32 = 6_000;
/// How long a relayed typing indicator may take to reach another node. Why: it shows
/// for [`TYPING_EXPIRES_MS`]; later than a second it is hardly worth showing, and a
/// dead node must not keep tasks waiting.
pub const TYPING_RELAY_TIMEOUT: Duration = Duration::from_secs(1);

/// The push of a typing indicator.
fn typing_push(chat: ChatId, user: UserId, typing: bool) -> Option<SharedPush> {
    SharedPush::new(push::Kind::Typing(v1::Typing {
        chat_id: chat,
        user_id: user,
        typing,
        expires_in_ms: if typing { TYPING_EXPIRES_MS } else { 0 },
    }))
}

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
    /// members on this node, and relays it to the other nodes with such members online
    /// (their last online lists, `online.rs`). The caller checked that `user` may post
    /// there; `group` is this node's replica of the chat's group.
    pub fn typing(&self, group: &Group, chat: ChatId, user: UserId, typing: bool) {
        let Some(frame) = typing_push(chat, user, typing) else {
            return;
        };
        for to in self.recipients_except(group, chat, user) {
            let _ = to.push_shared(&frame);
        }
        self.relay_typing(group, chat, user, typing);
    }

    /// Sends a `TypingRelay` to each other node whose online list holds members of
    /// `chat` other than `user`, naming them; one task per node, so a dead node holds
    /// back nobody. Best effort: a typist repeats within [`TYPING_EXPIRES_MS`].
    fn relay_typing(&self, group: &Group, chat: ChatId, user: UserId, typing: bool) {
        let Some(router) = self.node.router().cloned() else {
            return;
        };
        let targets: Vec<(NodeId, Vec<UserId>)> = {
            // Lock order: group state, then the registries.
            let st = group.shared().read();
            let remote = self.remote_online.lock().unwrap_or_else(|p| p.into_inner());
            remote
                .iter()
                .filter(|(_, (at, _))| at.elapsed() < ONLINE_REMOTE_EXPIRY)
                .filter_map(|(node, (_, users))| {
                    let recipients =
                        members_among(&st, chat, user, users.len(), users.iter(), |u| {
                            users.contains(u)
                        });
                    (!recipients.is_empty()).then_some((*node, recipients))
                })
                .collect()
        };
        for (node, mut recipients) in targets {
            recipients.truncate(FANOUT_POLL_USERS_MAX);
            let body = Bytes::from(
                TypingRelay {
                    chat_id: chat,
                    user_id: user,
                    typing,
                    recipients,
                }
                .encode_to_vec(),
            );
            let router = router.clone();
            tokio::spawn(async move {
                if let Err(error) = router.typing(node, body, TYPING_RELAY_TIMEOUT).await {
                    tracing::debug!(node, %error, "typing indicator not relayed");
                }
            });
        }
    }

    /// Pushes a typing indicator relayed by another node ([`Hub::relay_typing`]) to the
    /// sessions of its recipients here.
    pub(super) fn typing_from(&self, body: Bytes) -> Result<(), String> {
        let relay = TypingRelay::decode(body).map_err(|e| format!("a bad typing relay: {e}"))?;
        if relay.recipients.len() > FANOUT_POLL_USERS_MAX {
            return Err(format!(
                "a typing relay names {} users, more than {FANOUT_POLL_USERS_MAX}",
                relay.recipients.len()
            ));
        }
        let Some(frame) = typing_push(relay.chat_id, relay.user_id, relay.typing) else {
            return Ok(());
        };
        for to in self.conns_of(&relay.recipients) {
            let _ = to.push_shared(&frame);
        }
        Ok(())
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
