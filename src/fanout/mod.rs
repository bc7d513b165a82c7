//! The fan-out hub of one node: live delivery of new chat events and of a user's own
//! changes to every online session on this node, unasked.
//!
//! What it owns: the registry of authenticated connections by user (filled after a login
//! or a handshake with a session token, emptied when a connection closes), and one
//! watcher task per local group replica. A watcher follows the group's applied-index
//! watch; after each wake-up it finds the chats whose head moved past what it already
//! pushed, reads each chat's new events from the Raft log **once**, and pushes them as
//! `ChatEvents` (`request_id` 0) to every online session of every member, in seq order,
//! several events per push, each push encoded once and its bytes shared by every
//! recipient's queue. It does the same for the per-user logs of online users whose
//! user lives in the group (`UserEvent` pushes), and disconnects the connections of a
//! revoked session at once. Secret-chat messages go to the connections of their one
//! target device only (`secret.rs`, which also runs the expiry ticker), on a node
//! without a replica of the secret chat's group through its poller (`remote.rs`).
//!
//! What it must not do: work on the write path. Apply is untouched; a post to a chat
//! with 200,000 members costs one append, and only members with an online session here
//! cost a push. A watcher never blocks on a session: the gateway's `PushSender` is
//! bounded, and a session whose queue is full is disconnected as a slow reader
//! (`Disconnect(RATE_LIMITED)`); it reconnects and catches up with `sync` from the seqs
//! it holds. Other sessions are unaffected.
//!
//! Which chats moved comes from the group replica's changed-chats feed
//! (`chatlog_raft::feed`, filled by apply): a watcher's cursor is the last Raft index it
//! delivered, and after each wake-up it looks only at the chats and users recorded after
//! it (`news.rs`); if it fell off the feed it scans every chat instead, so nothing is
//! skipped. Sessions on a node without a replica of the chat's (or user's) group get the
//! same pushes through `remote.rs`: one poller per such group long-polls a replica over
//! the node transport with the same Raft-index cursor.
//!
//! Typing indicators cross nodes by a relay of their own; presence pushes stay per node
//! (`presence.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use chatlog_raft::GroupId;
use chatlog_raft::chat::{ChatId, Command, EventLoc, GroupState, UserId, group_of};
use chatlog_raft::node::{Group, Node};
use chatlog_wire::proto::v1::{self, ErrorCode, push};

use crate::gateway::{Principal, PushSender, SharedPush};
use crate::notify::Notifier;

mod news;
mod online;
mod presence;
mod remote;
use crate::service::{self, PAGE_BYTES_MAX, convert};
pub use online::{ONLINE_ANNOUNCE_INTERVAL, ONLINE_REMOTE_EXPIRY};
pub use presence::{PRESENCE_WATCH_MAX, TYPING_EXPIRES_MS, TYPING_RELAY_TIMEOUT};
pub use remote::{
    FANOUT_ANSWER_BYTES_MAX, FANOUT_ANSWER_EVENTS_MAX, FANOUT_GROUPS_RECHECK,
    FANOUT_POLL_USERS_MAX, FANOUT_POLL_WAIT_MS, FANOUT_POLL_WAIT_MS_MAX, FANOUT_REPOLL_PAUSE,
    FANOUT_RETRY_MAX, FANOUT_RETRY_MIN, FanoutDirectory,
};

mod secret;
pub use secret::SECRET_TICK_INTERVAL;

mod round;
pub use round::FANOUT_ROUND_EVENTS_MAX;

/// Events read from the log per read by a watcher (one `read_commands` call), and the
/// most events in one `ChatEvents` push. Why: a history page's worth; pushes are also cut
/// at [`PAGE_BYTES_MAX`] so that any push fits in one frame.
pub const FANOUT_READ_EVENTS_MAX: u64 = 100;

/// One authenticated connection in the registry.
#[derive(Debug, Clone)]
struct Conn {
    connection_id: u64,
    session_id: u64,
    /// The device id the session was opened with: secret-chat messages go to one device.
    device_id: String,
    pushes: PushSender,
}

/// A user with at least one connection on this node.
#[derive(Debug)]
struct OnlineUser {
    conns: Vec<Conn>,
    /// The head of the user's own log already pushed (or current when the user came
    /// online): the watcher pushes what lies beyond.
    log_pushed: u64,
}

#[derive(Debug, Default)]
struct Online {
    users: HashMap<UserId, OnlineUser>,
    user_of_connection: HashMap<u64, UserId>,
    /// Online users by the group holding their own log, for that group's watcher.
    users_by_group: HashMap<GroupId, BTreeSet<UserId>>,
}

impl Online {
    fn remove(&mut self, connection_id: u64) -> Option<Conn> {
        let user = self.user_of_connection.remove(&connection_id)?;
        let entry = self.users.get_mut(&user)?;
        let at = entry
            .conns
            .iter()
            .position(|c| c.connection_id == connection_id)?;
        let conn = entry.conns.swap_remove(at);
        if entry.conns.is_empty() {
            self.users.remove(&user);
            if let Some(set) = self.users_by_group.get_mut(&group_of(user)) {
                set.remove(&user);
            }
        }
        Some(conn)
    }
}

/// The fan-out hub of one node. Its watchers stop when it is dropped.
#[derive(Debug)]
pub struct Hub {
    node: Arc<Node>,
    online: RwLock<Online>,
    watchers: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Push notifications for members without an online session (`--push-webhook`).
    notifier: OnceLock<Arc<Notifier>>,
    /// Last-seen times and presence followers (`presence.rs`).
    presence: Mutex<presence::Presence>,
    /// Per group, the last Raft index whose events were delivered here (by the local
    /// watcher or the remote poller): handed over when one replaces the other.
    cursors: Mutex<HashMap<GroupId, u64>>,
    /// Bumped whenever a cursor moves: subscriptions to chats of groups without a replica
    /// here wake on it (`service/forward.rs`).
    cursor_moves: tokio::sync::watch::Sender<u64>,
    /// Bumped when a user comes online here: remote pollers ask again for them too.
    online_changes: tokio::sync::watch::Sender<u64>,
    /// What the pollers of groups without a replica here delivered (`remote.rs`), for
    /// subscriptions to their chats to tell whether a delivery can concern them.
    remote_news: Mutex<remote::RemoteNews>,
    /// The users online on each other node, as it last told (`online.rs`), and when.
    remote_online: Mutex<
        HashMap<chatlog_raft::NodeId, (std::time::Instant, std::collections::HashSet<UserId>)>,
    >,
}

impl Drop for Hub {
    fn drop(&mut self) {
        for w in self.watchers.get_mut().unwrap_or_else(|p| p.into_inner()) {
            w.abort();
        }
    }
}

/// The members of `chat` other than `except` among `count` users (`users`, and `has`
/// answering whether one is among them), in `st`, the chat group's state. Walks whichever
/// is smaller: those users or the chat's members.
fn members_among<'a>(
    st: &GroupState,
    chat: ChatId,
    except: UserId,
    count: usize,
    users: impl Iterator<Item = &'a UserId>,
    has: impl Fn(&UserId) -> bool,
) -> Vec<UserId> {
    let Some(view) = st.chat(chat) else {
        return Vec::new();
    };
    if (count as u64) < view.member_count {
        users
            .filter(|u| **u != except && st.role(chat, **u).is_some())
            .copied()
            .collect()
    } else {
        st.members(chat, 0, usize::MAX)
            .map(|(members, _)| members)
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.user)
            .filter(|u| *u != except && has(u))
            .collect()
    }
}

impl Hub {
    /// Starts the hub and one watcher per local group. Call from within a tokio runtime.
    pub fn start(node: Arc<Node>) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            node,
            online: RwLock::new(Online::default()),
            watchers: Mutex::new(Vec::new()),
            notifier: OnceLock::new(),
            presence: Mutex::default(),
            cursors: Mutex::default(),
            cursor_moves: tokio::sync::watch::Sender::new(0),
            online_changes: tokio::sync::watch::Sender::new(0),
            remote_online: Mutex::default(),
            remote_news: Mutex::default(),
        });
        let mut watchers = Vec::new();
        let mut watched = BTreeMap::new();
        let changes = hub.node.local_changes();
        for group in hub.node.groups() {
            let id = group.id();
            let running = Watcher::spawn(&hub, group);
            watchers.push(running.task.abort_handle());
            watched.insert(id, running);
        }
        watchers.push(tokio::spawn(secret::run_ticker(Arc::downgrade(&hub))).abort_handle());
        if hub.node.router().is_some() {
            watchers.push(tokio::spawn(online::announce(Arc::downgrade(&hub))).abort_handle());
        }
        let follow = tokio::spawn(follow_groups(
            Arc::downgrade(&hub),
            changes,
            watched,
            BTreeMap::new(),
        ));
        watchers.push(follow.abort_handle());
        *hub.watchers.lock().unwrap_or_else(|p| p.into_inner()) = watchers;
        hub
    }

    /// Sends notifications of new messages to members who are not online here.
    pub fn set_notifier(self: &Arc<Self>, notifier: Arc<Notifier>) {
        notifier.set_hub(Arc::downgrade(self));
        let _ = self.notifier.set(notifier);
    }

    /// Whether `user` has an authenticated connection on this node, or on another node
    /// of the cluster as that node last told (`online.rs`).
    pub fn is_online(&self, user: UserId) -> bool {
        self.online().users.contains_key(&user) || self.online_elsewhere(user)
    }

    fn online(&self) -> std::sync::RwLockReadGuard<'_, Online> {
        self.online.read().unwrap_or_else(|p| p.into_inner())
    }

    fn online_mut(&self) -> std::sync::RwLockWriteGuard<'_, Online> {
        self.online.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an authenticated connection under its user (again after a second login
    /// on the same connection: the earlier registration is replaced).
    pub fn register(&self, principal: &Principal, connection_id: u64, pushes: PushSender) {
        let user = principal.user_id;
        // Read before taking the registry lock: lock order is group state, then registry.
        let (log_head, device_id) = self.node.serving_group(group_of(user)).map_or_else(
            // No replica of the user's group here: the device as authenticated (the
            // login, or the node that checked the token); the user's log comes through
            // the cross-node poller from its own cursor.
            || (0, principal.device_id.to_string()),
            |g| {
                let st = g.shared().read();
                let device = st
                    .session_device(user, principal.session_id)
                    .unwrap_or_default();
                (st.user(user).map_or(0, |u| u.log_head), device)
            },
        );
        let mut online = self.online_mut();
        online.remove(connection_id);
        let came_online = !online.users.contains_key(&user);
        let entry = online.users.entry(user).or_insert_with(|| OnlineUser {
            conns: Vec::new(),
            log_pushed: log_head,
        });
        entry.conns.push(Conn {
            connection_id,
            session_id: principal.session_id,
            device_id,
            pushes,
        });
        online.user_of_connection.insert(connection_id, user);
        online
            .users_by_group
            .entry(group_of(user))
            .or_default()
            .insert(user);
        drop(online);
        if came_online {
            self.online_changes.send_modify(|n| *n += 1);
            self.presence_changed(user, true);
        }
    }

    /// Forgets a connection (it closed).
    pub fn unregister(&self, connection_id: u64) {
        let went_offline = {
            let mut online = self.online_mut();
            let user = online.user_of_connection.get(&connection_id).copied();
            online.remove(connection_id);
            user.filter(|u| !online.users.contains_key(u))
        };
        self.presence_forget(connection_id);
        if let Some(user) = went_offline {
            self.presence_changed(user, false);
        }
    }

    /// Registered connections, for tests and metrics.
    pub fn connections_online(&self) -> usize {
        self.online().user_of_connection.len()
    }

    fn set_cursor(&self, g: GroupId, index: u64) {
        let moved = self
            .cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(g, index)
            != Some(index);
        if moved {
            self.cursor_moves.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The last Raft index of group `g` whose events were delivered on this node (by its
    /// watcher or, for a group without a replica here, its poller), if any yet.
    pub fn delivered_through(&self, g: GroupId) -> Option<u64> {
        self.cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&g)
            .copied()
    }

    /// Changes whenever [`Hub::delivered_through`] moves for some group.
    pub fn deliveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cursor_moves.subscribe()
    }

    /// The push senders of the online sessions of `users` here.
    fn conns_of(&self, users: &[UserId]) -> Vec<PushSender> {
        let online = self.online();
        users
            .iter()
            .filter_map(|u| online.users.get(u))
            .flat_map(|u| u.conns.iter().map(|c| c.pushes.clone()))
            .collect()
    }

    /// The push senders of the online sessions of `chat`'s members, except `except`'s
    /// (0: none).
    fn recipients_except(&self, group: &Group, chat: ChatId, except: UserId) -> Vec<PushSender> {
        let st = group.shared().read();
        let online = self.online();
        let users = &online.users;
        members_among(&st, chat, except, users.len(), users.keys(), |u| {
            users.contains_key(u)
        })
        .iter()
        .filter_map(|u| users.get(u))
        .flat_map(|u| u.conns.iter().map(|c| c.pushes.clone()))
        .collect()
    }

    /// Pushes the events `from..=to` of one chat to `recipients`' sessions here.
    async fn push_chat(
        &self,
        group: &Group,
        chat: ChatId,
        from: u64,
        to: u64,
        recipients: &[UserId],
    ) {
        let recipients = self.conns_of(recipients);
        if recipients.is_empty() {
            return;
        }
        let mut next = from;
        while next <= to {
            let last = to.min(next + FANOUT_READ_EVENTS_MAX - 1);
            let locs = group
                .shared()
                .read()
                .chat_events(chat, next, last)
                .unwrap_or_default();
            let events = match read_chat_events(group, chat, &locs).await {
                Some(events) => events,
                None => {
                    // Sessions see the gap in seqs at their next push and sync.
                    tracing::error!(
                        chat,
                        from = next,
                        to = last,
                        "fan-out could not read events"
                    );
                    return;
                }
            };
            next = last + 1;
            for batch in split_by_bytes(events) {
                // Encoded once; every recipient's queue shares the bytes.
                let Some(frame) =
                    SharedPush::new(push::Kind::ChatEvents(v1::ChatEvents { events: batch }))
                else {
                    tracing::error!(chat, "fan-out push over the frame limit");
                    return;
                };
                for r in &recipients {
                    // A full queue disconnects that session only (slow reader).
                    let _ = r.push_shared(&frame);
                }
            }
        }
    }

    /// Pushes the new entries of the own logs of online users living in `group`.
    async fn push_user_events(&self, group: &Group) {
        let due: Vec<(UserId, u64, u64)> = {
            let st = group.shared().read();
            let online = self.online();
            let Some(users) = online.users_by_group.get(&group.id()) else {
                return;
            };
            users
                .iter()
                .filter_map(|u| {
                    let pushed = online.users.get(u)?.log_pushed;
                    let head = st.user_log_head(*u)?;
                    (head > pushed).then_some((*u, pushed, head))
                })
                .collect()
        };
        for (user, pushed, head) in due {
            let locs = group
                .shared()
                .read()
                .user_events(user, pushed + 1, head)
                .unwrap_or_default();
            let mut events = Vec::with_capacity(locs.len());
            match group.read_commands(&locs).await {
                Ok(rows) => {
                    for (seq, _, cmd, ts) in rows {
                        if let Some(e) = self.user_event(user, seq, &cmd, ts) {
                            events.push(e);
                        }
                    }
                }
                Err(e) => tracing::error!(user, error = %e, "fan-out could not read a user log"),
            }
            self.deliver_user_events(user, events, Some(head));
        }
    }

    /// Pushes `events` of `user`'s own log (in seq order) to the user's sessions here,
    /// those after the last one pushed only, and disconnects the connections of a
    /// revoked session. `head`: the log head they reach (default: the last event's seq).
    fn deliver_user_events(&self, user: UserId, events: Vec<v1::UserEvent>, head: Option<u64>) {
        let mut online = self.online_mut();
        let Some(entry) = online.users.get_mut(&user) else {
            return;
        };
        let pushed = entry.log_pushed;
        let head = head.unwrap_or_else(|| events.last().map_or(pushed, |e| e.seq));
        entry.log_pushed = pushed.max(head);
        let mut revoked = Vec::new();
        for e in events.into_iter().filter(|e| e.seq > pushed) {
            if let Some(v1::user_event::Body::SessionRevoked(r)) = &e.body {
                revoked.push(r.session_id);
            }
            for c in &entry.conns {
                let _ = c.pushes.push(0, push::Kind::UserEvent(e.clone()));
            }
        }
        let gone: Vec<u64> = entry
            .conns
            .iter()
            .filter(|c| revoked.contains(&c.session_id))
            .map(|c| c.connection_id)
            .collect();
        for id in gone {
            if let Some(c) = online.remove(id) {
                c.pushes.disconnect(convert::error(
                    ErrorCode::Unauthenticated,
                    "this session was revoked",
                ));
            }
        }
    }

    /// The `ChatAdded` body for `chat` as `user` sees it.
    fn chat_added(&self, chat: ChatId, user: UserId) -> v1::user_event::Body {
        v1::user_event::Body::ChatAdded(v1::ChatAdded {
            chat: Some(
                service::chat_summary(&self.node, chat, user).unwrap_or(v1::ChatSummary {
                    chat_id: chat,
                    ..Default::default()
                }),
            ),
        })
    }

    /// One entry of a user's own log as a protocol `UserEvent`.
    fn user_event(&self, user: UserId, seq: u64, cmd: &Command, ts: u64) -> Option<v1::UserEvent> {
        use v1::user_event::Body;
        let body = match cmd {
            Command::MarkRead { chat, seq, .. } => {
                let unread_count = self
                    .node
                    .serving_group(group_of(*chat))
                    .map_or(0, |g| service::unread_count(&g, *chat, user, *seq));
                Body::ReadMarkerMoved(v1::ReadMarkerMoved {
                    chat_id: *chat,
                    read_seq: *seq,
                    unread_count,
                })
            }
            Command::UserChatAdded { chat, .. } => self.chat_added(*chat, user),
            Command::UserChatRemoved { chat, .. } => {
                Body::ChatRemoved(v1::ChatRemoved { chat_id: *chat })
            }
            // A delivery holds at most one record per user: the one of this event.
            Command::ChatListDelivery { records, .. } => {
                let r = records.iter().find(|r| r.user == user)?;
                if r.added {
                    self.chat_added(r.chat, user)
                } else {
                    Body::ChatRemoved(v1::ChatRemoved { chat_id: r.chat })
                }
            }
            Command::RevokeSession { session_id, .. } => Body::SessionRevoked(v1::SessionRevoked {
                session_id: *session_id,
            }),
            _ => return None,
        };
        Some(v1::UserEvent {
            user_id: user,
            seq,
            timestamp_ms: ts,
            body: Some(body),
        })
    }
}

/// Reads the events at `locs` of one chat, all of them in order, or `None`.
async fn read_chat_events(
    group: &Group,
    chat: ChatId,
    locs: &[(u64, EventLoc)],
) -> Option<Vec<v1::Event>> {
    let rows = group.read_commands(locs).await.ok()?;
    let events: Option<Vec<v1::Event>> = rows
        .iter()
        .map(|(s, l, c, ts)| convert::chat_event(chat, *s, l, c, *ts))
        .collect();
    events.filter(|e| e.len() == locs.len())
}

/// Cuts consecutive events into pushes of at most [`PAGE_BYTES_MAX`] bytes each.
pub(crate) fn split_by_bytes(events: Vec<v1::Event>) -> Vec<Vec<v1::Event>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for e in events {
        let len = prost::Message::encoded_len(&e) + 8;
        if bytes + len > PAGE_BYTES_MAX && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(e);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Longest a watcher whose replica went away may take to finish its round before it is
/// aborted. Why: a round is a few log reads; waiting for it keeps the cursor handed to
/// the remote poller exact (no event pushed twice).
const WATCHER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running watcher of a local replica.
struct Watcher {
    /// Set to stop the watcher at its next round boundary.
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn spawn(hub: &Arc<Hub>, group: Group) -> Watcher {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(watch_group(Arc::downgrade(hub), group, stopped));
        Watcher { stop, task }
    }

    /// Stops the watcher between two rounds (aborts it after [`WATCHER_STOP_WAIT`]), so
    /// the cursor it left names exactly what it delivered.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(WATCHER_STOP_WAIT, self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Follows the node's local replicas as the placement changes them (`admin group add`,
/// replica moves): a watcher for each new one, none for one that moved away; and a
/// remote poller (`remote.rs`) for each chat group with no local replica, in a cluster.
/// A group changing hands between its watcher and its poller hands over its cursor: the
/// one stops (between rounds) before the other starts.
async fn follow_groups(
    hub: Weak<Hub>,
    mut changes: tokio::sync::watch::Receiver<u64>,
    mut watched: BTreeMap<GroupId, Watcher>,
    mut polled: BTreeMap<GroupId, tokio::task::JoinHandle<()>>,
) {
    loop {
        {
            let Some(h) = hub.upgrade() else { return };
            let groups = h.node.groups();
            let ids: BTreeSet<_> = groups.iter().map(Group::id).collect();
            let gone: Vec<GroupId> = watched
                .keys()
                .filter(|g| !ids.contains(g))
                .copied()
                .collect();
            for g in gone {
                if let Some(w) = watched.remove(&g) {
                    w.stop().await;
                }
            }
            for group in groups {
                let id = group.id();
                if watched.contains_key(&id) {
                    continue;
                }
                if let Some(poller) = polled.remove(&id) {
                    // A poller's delivery and cursor update have no await between them:
                    // aborted at an await, it leaves an exact cursor.
                    poller.abort();
                    let _ = poller.await;
                }
                let running = Watcher::spawn(&h, group);
                h.watchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(running.task.abort_handle());
                watched.insert(id, running);
            }
            polled.retain(|_, task| !task.is_finished());
            if h.node.router().is_some() {
                for g in 1..=h.node.chat_groups() {
                    if !ids.contains(&g) && !polled.contains_key(&g) {
                        let task = tokio::spawn(remote::poll_group(Weak::clone(&hub), g));
                        h.watchers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(task.abort_handle());
                        polled.insert(g, task);
                    }
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(FANOUT_GROUPS_RECHECK) => {}
        }
    }
}

/// The watcher of one local group replica (see the module docs).
async fn watch_group(
    hub: Weak<Hub>,
    group: Group,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = group.shared().applied();
    // What exists at start is history, not news: start from what is applied now, unless
    // a remote poller delivered this group here before (then from where it stopped).
    let mut covered = {
        let now = *applied.borrow_and_update();
        hub.upgrade()
            .and_then(|h| h.delivered_through(group.id()))
            .unwrap_or(now)
    };
    // Secret messages accepted before the start are fetched with `secret.pending`.
    let mut secret_pushed = group.shared().read().secret().last_message_no();
    loop {
        {
            let Some(hub) = hub.upgrade() else { return };
            let news = hub.news(&group, covered, u64::MAX, news::Audience::OnlineHere);
            // Every chat's pushes of the round, each log entry read once (`round.rs`).
            hub.push_chats(&group, &news.chats).await;
            for c in &news.chats {
                if let Some(n) = hub.notifier.get() {
                    n.chat_moved(&group, c.chat, c.from - 1, c.to);
                }
            }
            covered = news.through;
            hub.set_cursor(group.id(), covered);
            hub.push_user_events(&group).await;
            hub.push_secret(&group, &mut secret_pushed).await;
        }
        if *stopped.borrow() {
            return;
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = stopped.changed() => return,
        }
    }
}
