//! Cross-node fan-out: live events for sessions on a node that hosts no replica of the
//! chat's (or the user's) group.
//!
//! What it owns: one poller task per group this node hosts no replica of, and the
//! serving side of its requests. A poller long-polls one replica of the group over the
//! node transport (`fanout_request`, a `FanoutPoll`: "what moved after Raft index A for
//! these users online here", held by the replica until something was applied after A or
//! [`FANOUT_POLL_WAIT_MS`] passed) and pushes the answer (`FanoutAnswer`: per chat its
//! events and the recipients among those users, the users' own-log entries, and the
//! pending secret-chat messages for their devices) to the local sessions exactly like
//! the local watcher does. So each event travels once to
//! each node with interested sessions, and that node's hub writes it to each session.
//! The replica answers from its changed-chats feed (`news.rs`), or by a rescan of every
//! chat when the poller fell off the feed: nothing is skipped either way.
//!
//! The cursor is the Raft index A, which names the same entries on every replica. When
//! the polled replica dies, restarts, stops serving or moves away, the poller asks the
//! next replica in the placement with the same A: no gap, no duplicate. When a user comes
//! online here, the poll in flight is dropped and asked again with the new user list and
//! the same A, so that user misses nothing applied after they registered. When this node
//! gains a replica of the group, the poller stops at a round boundary and hands its
//! cursor to the local watcher (and a local watcher hands its cursor to the poller that
//! replaces it when the replica moves away).
//!
//! What it must not do: block on a session (pushes are the gateway's bounded queues, as
//! for local fan-out), or answer more than [`FANOUT_ANSWER_BYTES_MAX`] at once: an answer
//! covers fewer entries instead. A single entry too large to answer (thousands of chats,
//! each with thousands of the poller's users) is answered `lost`: the poller cuts those
//! users' sessions off as slow readers (`RATE_LIMITED`), and they resync, as a session
//! whose queue overflowed does.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use chatlog_raft::chat::{ChatId, Command, UserId};
use chatlog_raft::{ChatRaft, GroupDirectory, GroupId};
use chatlog_wire::proto::node::v1::{FanoutAnswer, FanoutChat, FanoutPoll};
use chatlog_wire::proto::v1::{self, ErrorCode, push};
use prost::Message;

use super::news::Audience;
use super::{Hub, read_chat_events, split_by_bytes};
use crate::gateway::SharedPush;
use crate::service::convert;

/// How long a replica holds a poll when nothing new was applied. Why: an idle poller
/// costs one request per group per this long; anything applied answers at once, so it
/// does not delay delivery.
pub const FANOUT_POLL_WAIT_MS: u32 = 5_000;
/// Longest wait a replica accepts in a poll. Why: under the transport's forwarded-work
/// deadline (`network::FORWARDED_WORK_TIMEOUT`, 12 s), so a held poll is never cut off
/// as failed work.
pub const FANOUT_POLL_WAIT_MS_MAX: u32 = 10_000;
/// Users one poll may name. Why: 800 KB of ids, far under the node frame limit (16 MiB),
/// and more online users than one node holds (the benches' targets: 15,000).
pub const FANOUT_POLL_USERS_MAX: usize = 100_000;
/// Encoded bytes of one answer at most; beyond it the answer covers fewer entries.
/// Why: half the node frame limit (16 MiB), so an answer never crowds out the Raft
/// traffic sharing the connection for long.
pub const FANOUT_ANSWER_BYTES_MAX: usize = 8 << 20;
/// Events (chat and user) in one answer at most, checked before any log read: the
/// answer covers fewer entries beyond it. Why: bounds the log reads behind one answer
/// (about 40 history pages).
pub const FANOUT_ANSWER_EVENTS_MAX: u64 = 4_096;
/// First pause after a failed poll before the next replica is asked; doubles per failure
/// up to [`FANOUT_RETRY_MAX`]. Why: a dead replica is noticed by the transport within
/// its connect timeout; asking the next one at once keeps the gap short.
pub const FANOUT_RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest pause between failed polls. Why: a group with no replica answering (an
/// outage) is retried about once a second, not in a loop.
pub const FANOUT_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pause before a poll is asked again because users came online here. Why: the
/// abandoned poll stays held on the replica until its wait ends (the protocol has no
/// cancel), so a burst of logins must not become thousands of held polls; 20 ms is
/// below what a person notices, and the new users miss nothing (same cursor).
pub const FANOUT_REPOLL_PAUSE: Duration = Duration::from_millis(20);
/// How often the hub looks for groups that need a poller (a group added to the
/// cluster does not change this node's local replicas). Why: a new group has no chats
/// with members online here for a while; a second is plenty.
pub const FANOUT_GROUPS_RECHECK: Duration = Duration::from_secs(1);

/// Chats whose newest delivered seq [`RemoteNews`] keeps at most; beyond, it forgets
/// everything (subscriptions then look at every delivery until the next ones). Why: one
/// entry per chat with news for users online here, ~16 bytes each: 1 MiB.
pub const REMOTE_NEWS_CHATS_MAX: usize = 1 << 16;

/// What the pollers of groups without a replica here delivered: per group, the users its
/// last delivered answer covered (its news for them was complete), sorted; per chat, the
/// newest seq an answer carried.
#[derive(Debug, Default)]
pub(crate) struct RemoteNews {
    covered: HashMap<GroupId, Vec<UserId>>,
    heads: HashMap<ChatId, u64>,
}

impl Hub {
    /// Notes a delivered answer of `g`'s poller that covered `users` and carried these
    /// chats' events up to these seqs (before the group's cursor moves, so a
    /// subscription woken by it sees them).
    fn note_remote_news(&self, g: GroupId, users: &[UserId], heads: &[(ChatId, u64)]) {
        let mut news = self.remote_news.lock().unwrap_or_else(|p| p.into_inner());
        if news.heads.len() + heads.len() > REMOTE_NEWS_CHATS_MAX {
            *news = RemoteNews::default();
        }
        for (chat, seq) in heads {
            let head = news.heads.entry(*chat).or_default();
            *head = (*head).max(*seq);
        }
        let mut covered = users.to_vec();
        covered.sort_unstable();
        news.covered.insert(g, covered);
    }

    /// Forgets what `g`'s poller covered (an answer that lost news, a failed poll).
    fn forget_remote_news(&self, g: GroupId) {
        let mut news = self.remote_news.lock().unwrap_or_else(|p| p.into_inner());
        news.covered.remove(&g);
    }

    /// Whether the deliveries of `g`'s poller so far may hold events of `chat` from seq
    /// `next` on for `user`: false only when its last answer covered the user and no
    /// answer carried the chat that far (a subscription then need not look).
    pub fn remote_news_may_hold(&self, g: GroupId, user: UserId, chat: ChatId, next: u64) -> bool {
        let news = self.remote_news.lock().unwrap_or_else(|p| p.into_inner());
        let covered = news
            .covered
            .get(&g)
            .is_some_and(|users| users.binary_search(&user).is_ok());
        !covered || news.heads.get(&chat).is_some_and(|head| *head >= next)
    }

    /// The users online here, at most [`FANOUT_POLL_USERS_MAX`] (the lowest ids).
    pub(super) fn online_users(&self) -> Vec<UserId> {
        let online = self.online();
        let mut users: Vec<UserId> = online.users.keys().copied().collect();
        if users.len() > FANOUT_POLL_USERS_MAX {
            users.sort_unstable();
            users.truncate(FANOUT_POLL_USERS_MAX);
            tracing::warn!(
                "more than {FANOUT_POLL_USERS_MAX} users online: cross-node fan-out covers the first"
            );
        }
        users
    }

    /// Serves a poll from another node for `group` (a replica here).
    pub(super) async fn serve_poll(&self, g: GroupId, body: Bytes) -> Result<Bytes, String> {
        let poll = FanoutPoll::decode(body).map_err(|e| format!("a bad fan-out poll: {e}"))?;
        if poll.users.len() > FANOUT_POLL_USERS_MAX {
            return Err(format!(
                "a fan-out poll names {} users, more than {FANOUT_POLL_USERS_MAX}",
                poll.users.len()
            ));
        }
        let group = self
            .node
            .serving_group(g)
            .ok_or_else(|| format!("node {} does not serve group {g}", self.node.node_id()))?;
        let mut applied = group.shared().applied();
        let encode = |a: FanoutAnswer| Bytes::from(a.encode_to_vec());
        if poll.start {
            let through_index = *applied.borrow();
            return Ok(encode(FanoutAnswer {
                through_index,
                ..FanoutAnswer::default()
            }));
        }
        let after = poll.after_index;
        let wait = Duration::from_millis(u64::from(poll.wait_ms.min(FANOUT_POLL_WAIT_MS_MAX)));
        if poll.users.is_empty() {
            // Nobody to deliver to: only keep the poller's cursor fresh.
            tokio::time::sleep(wait).await;
            let through_index = after.max(*applied.borrow());
            return Ok(encode(FanoutAnswer {
                through_index,
                ..FanoutAnswer::default()
            }));
        }
        let _ = tokio::time::timeout(wait, applied.wait_for(|a| *a > after)).await;
        let users: HashSet<UserId> = poll.users.into_iter().collect();
        let mut through_max = u64::MAX;
        loop {
            let news = self.news(&group, after, through_max, Audience::Users(&users));
            let secrets = Hub::secret_news(&group, after, news.through, &users);
            let narrower = after + (news.through - after) / 2;
            if news.events() + secrets.len() as u64 > FANOUT_ANSWER_EVENTS_MAX && narrower > after {
                through_max = narrower;
                continue;
            }
            let mut answer = FanoutAnswer {
                through_index: news.through,
                rescanned: news.rescanned,
                ..FanoutAnswer::default()
            };
            for c in news.chats {
                let locs = group
                    .shared()
                    .read()
                    .chat_events(c.chat, c.from, c.to)
                    .unwrap_or_default();
                let events = read_chat_events(&group, c.chat, &locs)
                    .await
                    .ok_or_else(|| format!("reading events of chat {} failed", c.chat))?;
                answer.chats.push(FanoutChat {
                    chat_id: c.chat,
                    events,
                    recipients: c.recipients,
                });
            }
            for u in news.users {
                let locs = group
                    .shared()
                    .read()
                    .user_events(u.user, u.from, u.to)
                    .unwrap_or_default();
                let rows = group
                    .read_commands(&locs)
                    .await
                    .map_err(|e| format!("reading user {}'s log: {e}", u.user))?;
                answer.user_events.extend(
                    rows.iter()
                        .filter_map(|(seq, _, cmd, ts)| self.user_event(u.user, *seq, cmd, *ts)),
                );
            }
            answer.secret_messages = Hub::read_secret_news(&group, secrets).await?;
            if answer.encoded_len() > FANOUT_ANSWER_BYTES_MAX {
                if narrower > after {
                    through_max = narrower;
                    continue;
                }
                // One entry too big to answer: the poller's users resync.
                tracing::warn!(
                    group = g,
                    after,
                    "a fan-out answer for one entry is too large"
                );
                return Ok(encode(FanoutAnswer {
                    through_index: news.through,
                    lost: true,
                    ..FanoutAnswer::default()
                }));
            }
            return Ok(encode(answer));
        }
    }

    /// Delivers an answer to the local sessions.
    fn deliver(&self, answer: FanoutAnswer, users: &[UserId]) {
        if answer.lost {
            let online = self.online();
            for u in users {
                for c in online.users.get(u).map_or(&[][..], |u| &u.conns[..]) {
                    c.pushes.disconnect(convert::error(
                        ErrorCode::RateLimited,
                        "live delivery was lost: resync",
                    ));
                }
            }
            return;
        }
        for chat in answer.chats {
            let recipients = self.conns_of(&chat.recipients);
            if recipients.is_empty() {
                continue;
            }
            for batch in split_by_bytes(chat.events) {
                let Some(frame) =
                    SharedPush::new(push::Kind::ChatEvents(v1::ChatEvents { events: batch }))
                else {
                    tracing::error!(chat = chat.chat_id, "fan-out push over the frame limit");
                    break;
                };
                for r in &recipients {
                    // A full queue disconnects that session only (slow reader).
                    let _ = r.push_shared(&frame);
                }
            }
        }
        let mut by_user: Vec<(UserId, Vec<v1::UserEvent>)> = Vec::new();
        for e in answer.user_events {
            match by_user.last_mut() {
                Some((u, list)) if *u == e.user_id => list.push(e),
                _ => by_user.push((e.user_id, vec![e])),
            }
        }
        for (user, events) in by_user {
            self.deliver_user_events(user, events, None);
        }
        self.deliver_secret_news(answer.secret_messages);
    }
}

/// The poller of group `g`, which this node hosts no replica of (see the module docs).
pub(super) async fn poll_group(hub: Weak<Hub>, g: GroupId) {
    let (me, mut online_changes, mut cursor) = {
        let Some(h) = hub.upgrade() else { return };
        (
            h.node.node_id(),
            h.online_changes.subscribe(),
            h.delivered_through(g),
        )
    };
    let mut turn = me as usize;
    let mut retry = FANOUT_RETRY_MIN;
    loop {
        let (router, target, users, body) = {
            let Some(h) = hub.upgrade() else { return };
            if h.node.group(g).is_some() {
                // A local replica took over; its watcher goes on from the cursor.
                return;
            }
            let Some(router) = h.node.router().cloned() else {
                return;
            };
            let replicas: Vec<_> = h
                .node
                .replicas_of(g)
                .into_iter()
                .filter(|n| *n != me)
                .collect();
            if replicas.is_empty() {
                drop(h);
                tokio::time::sleep(FANOUT_RETRY_MAX).await;
                continue;
            }
            let target = replicas[turn % replicas.len()];
            online_changes.borrow_and_update();
            let users = h.online_users();
            let poll = FanoutPoll {
                start: cursor.is_none(),
                after_index: cursor.unwrap_or(0),
                users: users.clone(),
                wait_ms: FANOUT_POLL_WAIT_MS,
            };
            (router, target, users, Bytes::from(poll.encode_to_vec()))
        };
        let ttl = Duration::from_millis(u64::from(FANOUT_POLL_WAIT_MS)) + FANOUT_ANSWER_TIME;
        let answer = tokio::select! {
            a = router.fanout(target, g, body, ttl) => a,
            // Someone came online here: ask again, for them too, from the same cursor
            // (after a pause that gathers a burst of logins into one new poll).
            _ = online_changes.changed() => {
                tokio::time::sleep(FANOUT_REPOLL_PAUSE).await;
                continue;
            }
        };
        let answer = match answer
            .map_err(|e| e.to_string())
            .and_then(|b| FanoutAnswer::decode(b).map_err(|e| e.to_string()))
        {
            Ok(a) => a,
            Err(error) => {
                tracing::info!(group = g, node = target, %error, "fan-out poll failed; asking the next replica");
                turn += 1;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(FANOUT_RETRY_MAX);
                continue;
            }
        };
        retry = FANOUT_RETRY_MIN;
        let Some(h) = hub.upgrade() else { return };
        let through = answer.through_index;
        if cursor.is_some_and(|c| through < c) {
            // A replica behind the one asked before: ask again (it waits to catch up).
            continue;
        }
        if cursor.is_some() {
            if answer.lost {
                h.forget_remote_news(g);
            } else {
                let heads: Vec<(ChatId, u64)> = answer
                    .chats
                    .iter()
                    .filter_map(|c| c.events.last().map(|e| (c.chat_id, e.seq)))
                    .collect();
                h.note_remote_news(g, &users, &heads);
            }
            h.deliver(answer, &users);
        }
        cursor = Some(through);
        h.set_cursor(g, through);
    }
}

/// Time allowed for an answer beyond the poll's wait: reading and sending it.
const FANOUT_ANSWER_TIME: Duration = Duration::from_secs(5);

/// What `GroupDirectory` methods return.
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// The node's [`GroupDirectory`] for its peer server with fan-out polls answered by the
/// hub, forwarded client requests by the service (`service/forward.rs`) and forwarded
/// bot calls by the bot API (`bot/forward.rs`), each set once it exists; everything
/// else goes to the wrapped directory.
pub struct FanoutDirectory {
    inner: Arc<dyn GroupDirectory>,
    hub: OnceLock<Weak<Hub>>,
    service: OnceLock<Weak<ForwardingService>>,
    bots: OnceLock<Weak<crate::bot::BotApi>>,
}

/// The service that answers forwarded client requests.
type ForwardingService = crate::http::CountedService<crate::service::ChatService>;

impl std::fmt::Debug for FanoutDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutDirectory").finish_non_exhaustive()
    }
}

impl FanoutDirectory {
    /// Wraps the node's group directory.
    pub fn new(inner: Arc<dyn GroupDirectory>) -> FanoutDirectory {
        FanoutDirectory {
            inner,
            hub: OnceLock::new(),
            service: OnceLock::new(),
            bots: OnceLock::new(),
        }
    }

    /// Answers forwarded bot calls with `bots` from now on.
    pub fn set_bots(&self, bots: &Arc<crate::bot::BotApi>) {
        let _ = self.bots.set(Arc::downgrade(bots));
    }

    /// Answers forwarded client requests with `service` from now on.
    pub fn set_service(&self, service: &Arc<ForwardingService>) {
        let _ = self.service.set(Arc::downgrade(service));
    }

    /// Answers fan-out polls with `hub` from now on.
    pub fn set_hub(&self, hub: &Arc<Hub>) {
        let _ = self.hub.set(Arc::downgrade(hub));
    }
}

impl GroupDirectory for FanoutDirectory {
    fn raft(&self, group: GroupId) -> Option<ChatRaft> {
        self.inner.raft(group)
    }

    // Issue 9: a damaged replica's vote refusal must reach the peer server.
    fn vote_refusal(&self, group: GroupId) -> Option<String> {
        self.inner.vote_refusal(group)
    }

    // Issue 9 (session 7): a vote-unknown replica's refusal of appends likewise.
    fn append_refusal(&self, group: GroupId) -> Option<String> {
        self.inner.append_refusal(group)
    }

    fn propose(
        &self,
        group: GroupId,
        raft: ChatRaft,
        commands: Vec<Command>,
    ) -> BoxFuture<(Vec<chatlog_raft::network::codec::ProposeResult>, u64)> {
        self.inner.propose(group, raft, commands)
    }

    fn media(&self, group: GroupId, body: Bytes) -> BoxFuture<Result<Bytes, String>> {
        self.inner.media(group, body)
    }

    fn fanout(&self, group: GroupId, body: Bytes) -> BoxFuture<Result<Bytes, String>> {
        let Some(hub) = self.hub.get().and_then(Weak::upgrade) else {
            return Box::pin(async { Err("this node's fan-out hub is starting".to_string()) });
        };
        Box::pin(async move { hub.serve_poll(group, body).await })
    }

    fn client_request(&self, group: GroupId, body: Bytes) -> BoxFuture<Result<Bytes, String>> {
        let Some(service) = self.service.get().and_then(Weak::upgrade) else {
            return Box::pin(async { Err("this node's client service is starting".to_string()) });
        };
        Box::pin(async move { service.inner().serve_forwarded(group, body).await })
    }

    fn bot_request(&self, group: GroupId, body: Bytes) -> BoxFuture<Result<Bytes, String>> {
        let Some(bots) = self.bots.get().and_then(Weak::upgrade) else {
            return Box::pin(async { Err("this node's bot API is starting".to_string()) });
        };
        Box::pin(async move { bots.serve_forwarded(group, body).await })
    }

    fn typing(&self, body: Bytes) -> Result<(), String> {
        match self.hub.get().and_then(Weak::upgrade) {
            Some(hub) => hub.typing_from(body),
            None => Ok(()),
        }
    }

    fn online(&self, from: chatlog_raft::NodeId, body: Bytes) -> Result<(), String> {
        match self.hub.get().and_then(Weak::upgrade) {
            Some(hub) => hub.online_from(from, body),
            None => Ok(()),
        }
    }
}
