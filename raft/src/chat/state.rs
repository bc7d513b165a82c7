//! A group's applied chat state and the rules that change it.
//!
//! What it owns: users (handles, login token hashes, sessions, read markers, chat lists),
//! chats (kind, title, members and roles, bans, pins), the per-chat index
//! `seq → (raft index, position in entry)`, the per-user log index, and the window of
//! recent `(chat, sender, client message id)` sends. The message bytes are NOT here: the
//! index points into the Raft log, which is the message log (DESIGN.md, decision 1).
//! What it must not do: anything non-deterministic (iteration order of a hash map into
//! an outcome or the encoding, clocks, randomness).
//!
//! Checkpoint bytes (`encode`/`decode`) are the whole state, little-endian, versioned;
//! maps are written in key order, so two replicas with the same history write the same
//! bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::chat::chat_lists::ChatLists;
use crate::chat::command::{
    ChatKind, Command, Outcome, RefusalCode, Role, TokenHash, kind_byte, kind_from, role_byte,
    role_from,
};
use crate::chat::key_hash::KeyHashBuilder;
use crate::chat::media::MediaState;
use crate::chat::retention::EventIndex;
use crate::chat::secret::SecretState;
use crate::chat::{ChatId, UserId, make_id};
use crate::codec::{DecodeError, Reader};
use crate::types::GroupId;

/// Version byte of the checkpoint encoding. Version 2 added the chat-list outbox (always
/// present, after the media part) and each chat's edits by message (after its events);
/// version 1 checkpoints still decode, with both empty (edits made before such a
/// checkpoint are not erased with their message).
pub const STATE_VERSION: u8 = 2;
/// Longest user handle.
pub const USER_NAME_BYTES_MAX: usize = 32;
/// Sessions a user may hold; a login beyond it ends the oldest.
pub const SESSIONS_PER_USER_MAX: usize = 64;
/// Recent sends remembered for de-duplication, per group.
pub const DEDUPE_ENTRIES_MAX: usize = 256 * 1024;
/// How long a send is remembered for de-duplication (by batch timestamps).
pub const DEDUPE_WINDOW_MS: u64 = 15 * 60 * 1000;
/// Largest Raft index an event location can name (40 bits).
pub const EVENT_RAFT_INDEX_MAX: u64 = (1 << 40) - 1;
/// Longest string decoded from a checkpoint.
const STATE_STRING_BYTES_MAX: usize = 64 * 1024;

/// What kind of event a log position holds, kept in the index so rules such as "only a
/// message can be edited" need no log read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// Chat: created.
    ChatCreated = 1,
    /// Chat: a message.
    MessagePosted = 2,
    /// Chat: an edit.
    MessageEdited = 3,
    /// Chat: a deletion.
    MessageDeleted = 4,
    /// Chat: a reaction change.
    ReactionChanged = 5,
    /// Chat: a pin change.
    PinChanged = 6,
    /// Chat: a member joined.
    MemberJoined = 7,
    /// Chat: a member left.
    MemberLeft = 8,
    /// Chat: a member was removed.
    MemberRemoved = 9,
    /// Chat: a user was banned.
    MemberBanned = 10,
    /// Chat: a ban was lifted.
    MemberUnbanned = 11,
    /// Chat: a role changed.
    RoleChanged = 12,
    /// User log: a read marker moved.
    ReadMarkerMoved = 20,
    /// User log: the user joined a chat.
    ChatAdded = 21,
    /// User log: the user left a chat.
    ChatRemoved = 22,
    /// User log: a session was revoked.
    SessionRevoked = 23,
}

impl EventKind {
    fn from_u8(b: u8) -> Option<EventKind> {
        use EventKind::*;
        Some(match b {
            1 => ChatCreated,
            2 => MessagePosted,
            3 => MessageEdited,
            4 => MessageDeleted,
            5 => ReactionChanged,
            6 => PinChanged,
            7 => MemberJoined,
            8 => MemberLeft,
            9 => MemberRemoved,
            10 => MemberBanned,
            11 => MemberUnbanned,
            12 => RoleChanged,
            20 => ReadMarkerMoved,
            21 => ChatAdded,
            22 => ChatRemoved,
            23 => SessionRevoked,
            _ => return None,
        })
    }
}

/// Where one event lives: the Raft entry and the command's position in it, plus what
/// the rules need without reading the log (kind, sender, erased flag). 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLoc {
    /// raft index (40 bits) | position (16) | kind (7) | erased (1).
    packed: u64,
    /// The user who caused the event.
    pub sender: UserId,
}

impl EventLoc {
    pub(crate) fn new(raft_index: u64, pos: usize, kind: EventKind, sender: UserId) -> EventLoc {
        debug_assert!(raft_index <= EVENT_RAFT_INDEX_MAX && pos < (1 << 16));
        EventLoc {
            packed: (raft_index << 24) | ((pos as u64) << 8) | ((kind as u64) << 1),
            sender,
        }
    }
    /// The Raft index of the entry holding the event's command.
    pub fn raft_index(&self) -> u64 {
        self.packed >> 24
    }
    /// The command's position in that entry's batch.
    pub fn pos(&self) -> usize {
        ((self.packed >> 8) & 0xffff) as usize
    }
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        EventKind::from_u8(((self.packed >> 1) & 0x7f) as u8).expect("kind checked on decode")
    }
    /// True once a message was deleted: its body must not be served.
    pub fn erased(&self) -> bool {
        self.packed & 1 == 1
    }
    pub(crate) fn erase(&mut self) {
        self.packed |= 1;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    device_id: String,
    device_name: String,
    token_hash: TokenHash,
    created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    name: String,
    login_token_hash: TokenHash,
    created_ms: u64,
    next_session: u64,
    sessions: BTreeMap<u64, Session>,
    chats: BTreeSet<ChatId>,
    read: BTreeMap<ChatId, u64>,
    /// The user's own log (read markers, chat list changes, revoked sessions).
    log: EventIndex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemberInfo {
    role: Role,
    joined_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Chat {
    kind: ChatKind,
    title: String,
    created_ms: u64,
    members: BTreeMap<UserId, MemberInfo>,
    banned: BTreeSet<UserId>,
    pinned: BTreeSet<u64>,
    /// `events.get(seq - 1)` is where event `seq` lives (older seqs may have been
    /// dropped by retention, `chat::retention`).
    events: EventIndex,
    /// Per message seq, the seqs of its edits, so a delete erases their texts too.
    /// Emptied for a message when it is deleted (it cannot be edited any more).
    edits: BTreeMap<u64, Vec<u64>>,
}

/// A chat as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatView {
    /// The chat.
    pub chat: ChatId,
    /// Its kind.
    pub kind: ChatKind,
    /// Its title.
    pub title: String,
    /// Its newest seq.
    pub head_seq: u64,
    /// How many members it has.
    pub member_count: u64,
}

/// One member as a reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberView {
    /// The user.
    pub user: UserId,
    /// Their role.
    pub role: Role,
    /// The seq of the event that made them a member.
    pub joined_seq: u64,
}

/// A user's own state as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    /// The user.
    pub user: UserId,
    /// The handle.
    pub name: String,
    /// The head of the user's own log.
    pub log_head: u64,
}

/// Sessions of a user as a reader sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The session's id.
    pub session_id: u64,
    /// The device id given at login.
    pub device_id: String,
    /// The device name given at login.
    pub device_name: String,
    /// When it was created.
    pub created_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DedupeKey {
    chat: ChatId,
    sender: UserId,
    client_message_id: u64,
}

/// Shards of the de-duplication map, per group. Why: the map grows to
/// [`DEDUPE_ENTRIES_MAX`] keys, and under an even load every group grows its map at the same
/// rate, so with one map per group all of them rehashed (up to a quarter million keys each)
/// on the apply path within the same few milliseconds: stalls of the tokio runtime of
/// 20–35 ms, the bursts behind the half-load p99 (benches/RESULTS.md, session 7). With 64
/// shards a rehash moves a 64th of the keys, and the shards reach their thresholds at
/// different posts, so no single apply does more than a small one.
pub const DEDUPE_SHARDS: usize = 64;

/// One remembered send: its seq and timestamp, and its number among every key
/// [`Dedupe`] appended (live while not below the evicted count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DedupeEntry {
    seq: u64,
    ts: u64,
    number: u64,
}

/// Smallest number of entries a shard holds before evicted keys are swept out of it.
/// Why: a shard holds about `DEDUPE_ENTRIES_MAX / DEDUPE_SHARDS` (4 Ki) live keys when
/// full; a quarter more leaves evicted keys in place (never removed one by one, a cold
/// probe per post) until one sequential sweep (`retain`) per ~1 Ki inserts clears them.
const DEDUPE_SHARD_SWEEP_MIN: usize = DEDUPE_ENTRIES_MAX / DEDUPE_SHARDS * 5 / 4;

#[derive(Debug, Clone)]
struct Dedupe {
    /// The live keys, oldest first, with their timestamps (what a checkpoint encodes).
    order: VecDeque<(u64, DedupeKey)>,
    /// [`DEDUPE_SHARDS`] maps; a key lives in the one its hash picks ([`Dedupe::shard`]).
    /// Looked up and inserted once per post: a cheap fixed hasher (`key_hash.rs`); their
    /// iteration order is never used (the encoding walks `order`). They also hold keys
    /// evicted from `order` (not live: [`Dedupe::get`] ignores them) until a sweep.
    seqs: Vec<HashMap<DedupeKey, DedupeEntry, KeyHashBuilder>>,
    /// Per shard, the size beyond which the next insert sweeps it (at least
    /// [`DEDUPE_SHARD_SWEEP_MIN`], a quarter above what a sweep left).
    sweep_at: Vec<usize>,
    /// Keys ever appended to `order`.
    appended: u64,
}

impl Default for Dedupe {
    fn default() -> Dedupe {
        Dedupe {
            order: VecDeque::new(),
            seqs: (0..DEDUPE_SHARDS).map(|_| HashMap::default()).collect(),
            sweep_at: vec![DEDUPE_SHARD_SWEEP_MIN; DEDUPE_SHARDS],
            appended: 0,
        }
    }
}

/// Equal when the same sends are remembered, in the same order (evicted keys still held
/// in the maps do not count: a replica restored from a checkpoint holds none).
impl PartialEq for Dedupe {
    fn eq(&self, other: &Dedupe) -> bool {
        self.order == other.order && self.order.iter().all(|(_, k)| self.get(k) == other.get(k))
    }
}

impl Eq for Dedupe {}

impl Dedupe {
    /// The shard of `key`: bits 32.. of its hash (the maps index buckets by the low bits
    /// and tag them with the top 7, so those stay spread within a shard).
    fn shard(key: &DedupeKey) -> usize {
        use std::hash::BuildHasher;
        (KeyHashBuilder::default().hash_one(key) >> 32) as usize % DEDUPE_SHARDS
    }

    /// Keys appended and evicted since: entries numbered below are not live.
    fn evicted(&self) -> u64 {
        self.appended - self.order.len() as u64
    }

    fn get(&self, key: &DedupeKey) -> Option<(u64, u64)> {
        let evicted = self.evicted();
        self.seqs[Dedupe::shard(key)]
            .get(key)
            .filter(|e| e.number >= evicted)
            .map(|e| (e.seq, e.ts))
    }

    fn insert(&mut self, key: DedupeKey, seq: u64, ts: u64) {
        while self.order.len() >= DEDUPE_ENTRIES_MAX
            || self
                .order
                .front()
                .is_some_and(|(t, _)| t.saturating_add(DEDUPE_WINDOW_MS) < ts)
        {
            // Left in its map, not live any more (swept later).
            if self.order.pop_front().is_none() {
                break;
            }
        }
        self.restore(key, seq, ts);
    }

    /// Appends `key` as the newest remembered send without expiring any (decoding a
    /// checkpoint, whose window was already cut).
    fn restore(&mut self, key: DedupeKey, seq: u64, ts: u64) {
        let number = self.appended;
        self.appended += 1;
        self.order.push_back((ts, key));
        let evicted = self.evicted();
        let i = Dedupe::shard(&key);
        let shard = &mut self.seqs[i];
        shard.insert(key, DedupeEntry { seq, ts, number });
        if shard.len() > self.sweep_at[i] {
            shard.retain(|_, e| e.number >= evicted);
            self.sweep_at[i] = DEDUPE_SHARD_SWEEP_MIN.max(shard.len() + shard.len() / 4);
        }
    }
}

/// The applied chat state of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    group: GroupId,
    next_user: u64,
    next_chat: u64,
    users: BTreeMap<UserId, User>,
    chats: BTreeMap<ChatId, Chat>,
    /// Derived: handle → user.
    names: HashMap<String, UserId>,
    /// Derived: the direct chat of a pair of users (smaller id first).
    directs: HashMap<(UserId, UserId), ChatId>,
    dedupe: Dedupe,
    /// Events appended (chat and user logs), for metrics.
    events_applied: u64,
    /// Bots whose user lives in this group (`bot.rs`); encoded last.
    bots: crate::chat::bot::Bots,
    /// Secret chats (`secret.rs`); encoded last in the checkpoint.
    secret: SecretState,
    /// The cluster placement: group 0 only (`chat::placement`); empty elsewhere.
    placement: crate::chat::placement::Placement,
    /// Stored files of this group's users and media grants of its chats.
    media: MediaState,
    /// The chat-list outbox of this group's chats and the delivery marks of this
    /// group's users (`chat_lists.rs`).
    chat_lists: ChatLists,
    /// Retention (`chat/retention.rs`): the indexes point at no Raft entry below this
    /// (0: nothing trimmed).
    retained_from: u64,
    /// Retention: byte counts of the applied log for the byte policy.
    ledger: crate::chat::retention::ByteLedger,
    /// Retention (s8retention): the group's replicated policy, `None` until a
    /// `Command::Retention` set one (keep everything). Encoded last.
    retention_policy: Option<crate::chat::retention::RetentionPolicy>,
}

fn refuse(code: RefusalCode, msg: impl Into<String>) -> Outcome {
    Outcome::refused(code, msg)
}

/// Checks a handle: 1 to 32 bytes of lowercase ASCII letters, digits and underscore.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= USER_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl GroupState {
    /// The empty state of group `group`.
    pub fn new(group: GroupId) -> GroupState {
        GroupState {
            group,
            next_user: 1,
            next_chat: 1,
            users: BTreeMap::new(),
            chats: BTreeMap::new(),
            names: HashMap::new(),
            directs: HashMap::new(),
            dedupe: Dedupe::default(),
            events_applied: 0,
            bots: crate::chat::bot::Bots::default(),
            secret: SecretState::default(),
            placement: Default::default(),
            media: MediaState::default(),
            chat_lists: ChatLists::default(),
            retained_from: 0,
            ledger: Default::default(),
            retention_policy: None,
        }
    }

    /// Whether event `seq` of `chat` was erased (a deleted message, or an edit of one).
    pub fn event_erased(&self, chat: ChatId, seq: u64) -> bool {
        seq >= 1
            && self
                .chats
                .get(&chat)
                .and_then(|c| c.events.get(seq as usize - 1))
                .is_some_and(EventLoc::erased)
    }

    /// The chat-list outbox and delivery marks (`chat_lists.rs`).
    pub fn chat_lists(&self) -> &ChatLists {
        &self.chat_lists
    }

    #[cfg(test)]
    pub(crate) fn chat_lists_mut(&mut self) -> &mut ChatLists {
        &mut self.chat_lists
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Events appended to chat and user logs so far.
    pub fn events_applied(&self) -> u64 {
        self.events_applied
    }

    /// The cluster placement (bootstrapped in group 0 only).
    pub fn placement(&self) -> &crate::chat::placement::Placement {
        &self.placement
    }

    /// Applies command `pos` of the batch in Raft entry `raft_index`, stamped `ts`.
    pub fn apply(&mut self, cmd: &Command, ts: u64, raft_index: u64, pos: usize) -> Outcome {
        if raft_index > EVENT_RAFT_INDEX_MAX {
            // Unreachable in practice (a trillion entries); refuse rather than corrupt.
            return refuse(RefusalCode::BadRequest, "raft index beyond the event index");
        }
        let at = |kind, sender| EventLoc::new(raft_index, pos, kind, sender);
        match cmd {
            Command::Retention(c) => self.apply_retention(c),
            Command::Placement(p) => {
                if self.group != 0 {
                    return refuse(
                        RefusalCode::BadRequest,
                        "placement commands belong to the controller group 0",
                    );
                }
                self.placement.apply(p)
            }
            Command::CreateUser {
                name,
                login_token_hash,
            } => {
                if !valid_user_name(name) {
                    return refuse(
                        RefusalCode::BadRequest,
                        format!(
                            "user name {name:?} is not 1 to {USER_NAME_BYTES_MAX} bytes of a-z, 0-9 and _"
                        ),
                    );
                }
                if self.names.contains_key(name) {
                    return refuse(
                        RefusalCode::Conflict,
                        format!("user name {name:?} is taken"),
                    );
                }
                let id = make_id(self.group, self.next_user);
                self.next_user += 1;
                self.users.insert(
                    id,
                    User {
                        name: name.clone(),
                        login_token_hash: *login_token_hash,
                        created_ms: ts,
                        next_session: 1,
                        sessions: BTreeMap::new(),
                        chats: BTreeSet::new(),
                        read: BTreeMap::new(),
                        log: EventIndex::default(),
                    },
                );
                self.names.insert(name.clone(), id);
                Outcome::UserCreated { user: id }
            }
            Command::Login {
                user,
                login_token_hash,
                device_id,
                device_name,
                session_token_hash,
            } => {
                let Some(u) = self.users.get_mut(user) else {
                    return refuse(RefusalCode::Unauthenticated, "unknown user or wrong token");
                };
                if u.login_token_hash != *login_token_hash {
                    return refuse(RefusalCode::Unauthenticated, "unknown user or wrong token");
                }
                if device_id.is_empty() {
                    return refuse(RefusalCode::BadRequest, "device id is empty");
                }
                u.sessions.retain(|_, s| s.device_id != *device_id);
                while u.sessions.len() >= SESSIONS_PER_USER_MAX {
                    u.sessions.pop_first();
                }
                let session_id = u.next_session;
                u.next_session += 1;
                u.sessions.insert(
                    session_id,
                    Session {
                        device_id: device_id.clone(),
                        device_name: device_name.clone(),
                        token_hash: *session_token_hash,
                        created_ms: ts,
                    },
                );
                Outcome::LoggedIn {
                    user: *user,
                    session_id,
                }
            }
            Command::RevokeSession { user, session_id } => {
                let Some(u) = self.users.get_mut(user) else {
                    return refuse(RefusalCode::NotFound, format!("no user {user}"));
                };
                if u.sessions.remove(session_id).is_none() {
                    return refuse(RefusalCode::NotFound, format!("no session {session_id}"));
                }
                u.log.push(at(EventKind::SessionRevoked, *user));
                self.events_applied += 1;
                Outcome::UserEvent {
                    user: *user,
                    seq: u.log.len() as u64,
                    read_seq: 0,
                }
            }
            Command::CreateChat {
                creator,
                kind,
                title,
                members,
            } => self.create_chat(*creator, *kind, title, members, ts, at),
            Command::MarkRead { user, chat, seq } => {
                let Some(u) = self.users.get_mut(user) else {
                    return refuse(RefusalCode::NotFound, format!("no user {user}"));
                };
                let current = u.read.get(chat).copied().unwrap_or(0);
                if *seq <= current {
                    return Outcome::UserEvent {
                        user: *user,
                        seq: 0,
                        read_seq: current,
                    };
                }
                u.read.insert(*chat, *seq);
                u.log.push(at(EventKind::ReadMarkerMoved, *user));
                self.events_applied += 1;
                Outcome::UserEvent {
                    user: *user,
                    seq: u.log.len() as u64,
                    read_seq: *seq,
                }
            }
            Command::UserChatAdded { user, chat } | Command::UserChatRemoved { user, chat } => {
                let added = matches!(cmd, Command::UserChatAdded { .. });
                let Some(u) = self.users.get_mut(user) else {
                    return refuse(RefusalCode::NotFound, format!("no user {user}"));
                };
                let changed = if added {
                    u.chats.insert(*chat)
                } else {
                    u.chats.remove(chat)
                };
                if !changed {
                    return Outcome::UserEvent {
                        user: *user,
                        seq: 0,
                        read_seq: 0,
                    };
                }
                let kind = if added {
                    EventKind::ChatAdded
                } else {
                    EventKind::ChatRemoved
                };
                u.log.push(at(kind, *user));
                self.events_applied += 1;
                Outcome::UserEvent {
                    user: *user,
                    seq: u.log.len() as u64,
                    read_seq: 0,
                }
            }
            Command::ChatListDelivery { source, records } => {
                let mut users = Vec::new();
                for r in records {
                    if !self.chat_lists.take_delivery(*source, r.no) {
                        continue;
                    }
                    // A record for a user this group does not have changes nothing (the
                    // mark still moves: the record is handled).
                    let Some(u) = self.users.get_mut(&r.user) else {
                        continue;
                    };
                    let changed = if r.added {
                        u.chats.insert(r.chat)
                    } else {
                        u.chats.remove(&r.chat)
                    };
                    if changed {
                        let kind = if r.added {
                            EventKind::ChatAdded
                        } else {
                            EventKind::ChatRemoved
                        };
                        u.log.push(at(kind, r.user));
                        self.events_applied += 1;
                        users.push(r.user);
                    }
                }
                Outcome::ChatListsDelivered { users }
            }
            Command::ChatListAcked { upto } => self.chat_lists.apply_acked(*upto),
            Command::Bot(c) => self.apply_bot(c, ts),
            Command::Secret(c) => {
                let users = &self.users;
                self.secret.apply(self.group, c, ts, raft_index, pos, |u| {
                    users.contains_key(&u)
                })
            }
            Command::MediaStored { uploader, media } => {
                if !self.users.contains_key(uploader) {
                    return refuse(RefusalCode::NotFound, format!("no user {uploader}"));
                }
                self.media.apply_stored(*uploader, media, ts)
            }
            _ => self.apply_chat_command(cmd, ts, at),
        }
    }

    // ---- bots (issue 11): the commands of `bot.rs` that touch users ---------------

    /// The group's bots.
    pub fn bots(&self) -> &crate::chat::bot::Bots {
        &self.bots
    }

    fn apply_bot(&mut self, cmd: &crate::chat::bot::BotCommand, ts: u64) -> Outcome {
        use crate::chat::bot::{BOT_DEVICE_ID, BotCommand};
        let api_session = |token_hash: TokenHash| Session {
            device_id: BOT_DEVICE_ID.to_string(),
            device_name: "bot API token".to_string(),
            token_hash,
            created_ms: ts,
        };
        match cmd {
            BotCommand::Create {
                owner,
                name,
                token_hash,
            } => {
                if *owner == 0 {
                    return refuse(RefusalCode::BadRequest, "user id 0 is not a user");
                }
                // A bot is a user: same handle rules, same namespace. Its login token
                // hash is all zeros, which no token hashes to: it has no login, only
                // its API session.
                let created = self.apply(
                    &Command::CreateUser {
                        name: name.clone(),
                        login_token_hash: [0; 32],
                    },
                    ts,
                    0,
                    0,
                );
                let Outcome::UserCreated { user } = created else {
                    return created;
                };
                let u = self.users.get_mut(&user).expect("just created");
                u.sessions.insert(u.next_session, api_session(*token_hash));
                u.next_session += 1;
                self.bots.insert(user, *owner);
                Outcome::UserCreated { user }
            }
            BotCommand::SetToken {
                bot,
                owner,
                token_hash,
            } => {
                if self.bots.get(*bot).map(|b| b.owner()) != Some(*owner) {
                    return refuse(
                        RefusalCode::PermissionDenied,
                        format!("user {owner} does not own a bot {bot}"),
                    );
                }
                let u = self.users.get_mut(bot).expect("a bot is a user");
                u.sessions.clear();
                let session_id = u.next_session;
                u.sessions.insert(session_id, api_session(*token_hash));
                u.next_session += 1;
                Outcome::BotDone {
                    bot: *bot,
                    value: session_id,
                }
            }
            other => self.bots.apply(other),
        }
    }

    /// The secret-chat part of the state.
    pub fn secret(&self) -> &SecretState {
        &self.secret
    }

    fn create_chat(
        &mut self,
        creator: UserId,
        kind: ChatKind,
        title: &str,
        members: &[UserId],
        ts: u64,
        at: impl Fn(EventKind, UserId) -> EventLoc,
    ) -> Outcome {
        let mut others: Vec<UserId> = members.iter().copied().filter(|m| *m != creator).collect();
        others.sort_unstable();
        others.dedup();
        if others.contains(&0) || creator == 0 {
            return refuse(RefusalCode::BadRequest, "user id 0 is not a user");
        }
        let pair = if kind == ChatKind::Direct {
            if others.len() != 1 || !title.is_empty() {
                return refuse(
                    RefusalCode::BadRequest,
                    "a direct chat has exactly one other member and no title",
                );
            }
            let pair = (creator.min(others[0]), creator.max(others[0]));
            if let Some(&chat) = self.directs.get(&pair) {
                return Outcome::Event {
                    chat,
                    seq: 1,
                    timestamp_ms: self.chats[&chat].created_ms,
                    deduplicated: true,
                };
            }
            Some(pair)
        } else {
            if title.is_empty() {
                return refuse(RefusalCode::BadRequest, "a group or channel needs a title");
            }
            None
        };
        if !self.chat_lists.has_room(1 + others.len()) {
            return self.chat_lists.full_refusal();
        }
        let id = make_id(self.group, self.next_chat);
        self.next_chat += 1;
        self.chat_lists.push(creator, id, true);
        for m in &others {
            self.chat_lists.push(*m, id, true);
        }
        let creator_role = if kind == ChatKind::Direct {
            Role::Member
        } else {
            Role::Owner
        };
        let mut chat = Chat {
            kind,
            title: title.to_string(),
            created_ms: ts,
            members: BTreeMap::new(),
            banned: BTreeSet::new(),
            pinned: BTreeSet::new(),
            events: EventIndex::from_locs(vec![at(EventKind::ChatCreated, creator)]),
            edits: BTreeMap::new(),
        };
        chat.members.insert(
            creator,
            MemberInfo {
                role: creator_role,
                joined_seq: 1,
            },
        );
        for m in others {
            chat.members.insert(
                m,
                MemberInfo {
                    role: Role::Member,
                    joined_seq: 1,
                },
            );
        }
        self.chats.insert(id, chat);
        if let Some(pair) = pair {
            self.directs.insert(pair, id);
        }
        self.events_applied += 1;
        Outcome::Event {
            chat: id,
            seq: 1,
            timestamp_ms: ts,
            deduplicated: false,
        }
    }

    fn apply_chat_command(
        &mut self,
        cmd: &Command,
        ts: u64,
        at: impl Fn(EventKind, UserId) -> EventLoc,
    ) -> Outcome {
        let Some(chat_id) = cmd.chat() else {
            return refuse(RefusalCode::BadRequest, "not a chat command");
        };
        // A retried post returns its original seq whatever changed since.
        if let Command::Post {
            sender,
            client_message_id,
            ..
        } = cmd
            && let Some((seq, ts)) = self.dedupe.get(&DedupeKey {
                chat: chat_id,
                sender: *sender,
                client_message_id: *client_message_id,
            })
        {
            return Outcome::Event {
                chat: chat_id,
                seq,
                timestamp_ms: ts,
                deduplicated: true,
            };
        }
        let Some(chat) = self.chats.get_mut(&chat_id) else {
            return refuse(RefusalCode::NotFound, format!("no chat {chat_id}"));
        };
        let (kind, sender) = match check_chat_command(chat, cmd) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let seq = chat.events.len() as u64 + 1;
        // The member's own chat list follows through the outbox, in this same apply.
        let list_change = match cmd {
            Command::Invite { user, .. } | Command::Join { actor: user, .. } => Some((*user, true)),
            Command::RemoveMember { user, .. }
            | Command::Leave { actor: user, .. }
            | Command::Ban { user, .. } => Some((*user, false)),
            _ => None,
        };
        if let Some((user, added)) = list_change {
            if !self.chat_lists.has_room(1) {
                return self.chat_lists.full_refusal();
            }
            self.chat_lists.push(user, chat_id, added);
        }
        let chat = self.chats.get_mut(&chat_id).expect("checked above");
        // The change itself, now that every check passed.
        match cmd {
            Command::Invite { user, .. } | Command::Join { actor: user, .. } => {
                chat.members.insert(
                    *user,
                    MemberInfo {
                        role: Role::Member,
                        joined_seq: seq,
                    },
                );
            }
            Command::RemoveMember { user, .. } | Command::Leave { actor: user, .. } => {
                chat.members.remove(user);
            }
            Command::Ban { user, .. } => {
                chat.members.remove(user);
                chat.banned.insert(*user);
            }
            Command::Unban { user, .. } => {
                chat.banned.remove(user);
            }
            Command::SetRole { user, role, .. } => {
                if let Some(m) = chat.members.get_mut(user) {
                    m.role = *role;
                }
            }
            Command::Delete { target, .. } => {
                // The body leaves the served history now and the disk soon: the
                // message and each of its edits is marked erased here, and every
                // replica's eraser zeroes their texts in the log (`secret_log`).
                let mut erased = vec![*target];
                erased.extend(chat.edits.remove(target).unwrap_or_default());
                for s in erased {
                    // An edit older than the retention horizon is gone with its entry.
                    let Some(loc) = chat.events.erase(s as usize - 1) else {
                        continue;
                    };
                    self.secret
                        .record_erasure(loc.raft_index(), loc.pos() as u32, ts);
                }
                chat.pinned.remove(target);
            }
            Command::Edit { target, .. } => {
                chat.edits.entry(*target).or_default().push(seq);
            }
            Command::Pin { target, pin, .. } => {
                if *pin {
                    chat.pinned.insert(*target);
                } else {
                    chat.pinned.remove(target);
                }
            }
            Command::Post {
                client_message_id,
                media,
                ..
            } => {
                if let Some(m) = media {
                    self.media.grant(&m.sha256, chat_id);
                }
                self.dedupe.insert(
                    DedupeKey {
                        chat: chat_id,
                        sender,
                        client_message_id: *client_message_id,
                    },
                    seq,
                    ts,
                );
            }
            _ => {}
        }
        let chat = self.chats.get_mut(&chat_id).expect("checked above");
        chat.events.push(at(kind, sender));
        self.events_applied += 1;
        Outcome::Event {
            chat: chat_id,
            seq,
            timestamp_ms: ts,
            deduplicated: false,
        }
    }

    /// Applies a post known by its fields alone (the hot path: no text is decoded).
    /// Same rules and outcome as applying the full `Command::Post`.
    pub fn apply_post(&mut self, p: &PostFields, ts: u64, raft_index: u64, pos: usize) -> Outcome {
        if raft_index > EVENT_RAFT_INDEX_MAX {
            return refuse(RefusalCode::BadRequest, "raft index beyond the event index");
        }
        let key = DedupeKey {
            chat: p.chat,
            sender: p.sender,
            client_message_id: p.client_message_id,
        };
        // A retried post returns its original seq whatever changed since.
        if let Some((seq, ts)) = self.dedupe.get(&key) {
            return Outcome::Event {
                chat: p.chat,
                seq,
                timestamp_ms: ts,
                deduplicated: true,
            };
        }
        let Some(chat) = self.chats.get_mut(&p.chat) else {
            return refuse(RefusalCode::NotFound, format!("no chat {}", p.chat));
        };
        if let Err(o) = check_post(chat, p) {
            return o;
        }
        let seq = chat.events.len() as u64 + 1;
        chat.events.push(EventLoc::new(
            raft_index,
            pos,
            EventKind::MessagePosted,
            p.sender,
        ));
        self.dedupe.insert(key, seq, ts);
        self.events_applied += 1;
        Outcome::Event {
            chat: p.chat,
            seq,
            timestamp_ms: ts,
            deduplicated: false,
        }
    }

    // ---- reads -------------------------------------------------------------------

    /// A chat's summary.
    pub fn chat(&self, chat: ChatId) -> Option<ChatView> {
        self.chats.get(&chat).map(|c| ChatView {
            chat,
            kind: c.kind,
            title: c.title.clone(),
            head_seq: c.events.len() as u64,
            member_count: c.members.len() as u64,
        })
    }

    /// Stored files of this group's users and media grants of its chats.
    pub fn media(&self) -> &MediaState {
        &self.media
    }

    /// A chat's newest seq, `None` if there is no such chat. Cheap (no copy), for
    /// watchers that poll many chats.
    pub fn head_seq(&self, chat: ChatId) -> Option<u64> {
        self.chats.get(&chat).map(|c| c.events.len() as u64)
    }

    /// The head of a user's own log, `None` if there is no such user. Cheap (no copy).
    pub fn user_log_head(&self, user: UserId) -> Option<u64> {
        self.users.get(&user).map(|u| u.log.len() as u64)
    }

    /// The first seq of `chat` whose event was applied in a Raft entry after
    /// `raft_index` (the head + 1 when none was), `None` if there is no such chat. A
    /// search from the head back (events are appended in apply order): for the fan-out
    /// cursors (`crate::feed`), which are recent Raft indexes, the same on every replica.
    pub fn chat_seq_after(&self, chat: ChatId, raft_index: u64) -> Option<u64> {
        let c = self.chats.get(&chat)?;
        Some(c.events.partition_point(|e| e.raft_index() <= raft_index) as u64 + 1)
    }

    /// [`GroupState::chat_seq_after`] for a user's own log.
    pub fn user_seq_after(&self, user: UserId, raft_index: u64) -> Option<u64> {
        let u = self.users.get(&user)?;
        Some(u.log.partition_point(|e| e.raft_index() <= raft_index) as u64 + 1)
    }

    /// A user's role in a chat, `None` if not a member (or no such chat).
    pub fn role(&self, chat: ChatId, user: UserId) -> Option<Role> {
        self.chats.get(&chat)?.members.get(&user).map(|m| m.role)
    }

    /// The seq at which member `user` joined `chat` (None when not a member).
    pub fn joined_seq(&self, chat: ChatId, user: UserId) -> Option<u64> {
        self.chats
            .get(&chat)?
            .members
            .get(&user)
            .map(|m| m.joined_seq)
    }

    /// True if `user` is banned from `chat`.
    pub fn is_banned(&self, chat: ChatId, user: UserId) -> bool {
        self.chats
            .get(&chat)
            .is_some_and(|c| c.banned.contains(&user))
    }

    /// Members of a chat after user id `after`, at most `limit`, and whether more follow.
    pub fn members(
        &self,
        chat: ChatId,
        after: UserId,
        limit: usize,
    ) -> Option<(Vec<MemberView>, bool)> {
        let c = self.chats.get(&chat)?;
        let mut it = c
            .members
            .range(after.saturating_add(1)..)
            .map(|(u, m)| MemberView {
                user: *u,
                role: m.role,
                joined_seq: m.joined_seq,
            });
        let page: Vec<_> = it.by_ref().take(limit).collect();
        Some((page, it.next().is_some()))
    }

    /// Where events `from..=to` of a chat live (clamped to what exists).
    pub fn chat_events(&self, chat: ChatId, from: u64, to: u64) -> Option<Vec<(u64, EventLoc)>> {
        let c = self.chats.get(&chat)?;
        let head = c.events.len() as u64;
        // Below the first retained seq a read starts there (wire/PROTOCOL.md, retention).
        let from = from.max(c.events.first_seq());
        let to = to.min(head);
        if from > to {
            return Some(Vec::new());
        }
        Some(
            (from..=to)
                .filter_map(|s| c.events.get(s as usize - 1).map(|l| (s, *l)))
                .collect(),
        )
    }

    /// A user's summary.
    pub fn user(&self, user: UserId) -> Option<UserView> {
        self.users.get(&user).map(|u| UserView {
            user,
            name: u.name.clone(),
            log_head: u.log.len() as u64,
        })
    }

    /// The user whose handle is `name`, if it lives in this group.
    pub fn user_by_name(&self, name: &str) -> Option<UserId> {
        self.names.get(name).copied()
    }

    /// The session of `user` whose token hashes to `token_hash`.
    pub fn session_by_token(&self, user: UserId, token_hash: &TokenHash) -> Option<u64> {
        self.users
            .get(&user)?
            .sessions
            .iter()
            .find(|(_, s)| s.token_hash == *token_hash)
            .map(|(id, _)| *id)
    }

    /// True while `user` holds session `session_id`.
    pub fn has_session(&self, user: UserId, session_id: u64) -> bool {
        self.users
            .get(&user)
            .is_some_and(|u| u.sessions.contains_key(&session_id))
    }

    /// The device of `user`'s session `session_id`, while it lives.
    pub fn session_device(&self, user: UserId, session_id: u64) -> Option<String> {
        Some(
            self.users
                .get(&user)?
                .sessions
                .get(&session_id)?
                .device_id
                .clone(),
        )
    }

    /// The live sessions of a user, oldest first.
    pub fn sessions(&self, user: UserId) -> Vec<SessionView> {
        self.users.get(&user).map_or_else(Vec::new, |u| {
            u.sessions
                .iter()
                .map(|(id, s)| SessionView {
                    session_id: *id,
                    device_id: s.device_id.clone(),
                    device_name: s.device_name.clone(),
                    created_ms: s.created_ms,
                })
                .collect()
        })
    }

    /// The chats a user's own log lists, after `after`, at most `limit`.
    pub fn user_chats(&self, user: UserId, after: ChatId, limit: usize) -> (Vec<ChatId>, bool) {
        let Some(u) = self.users.get(&user) else {
            return (Vec::new(), false);
        };
        let mut it = u.chats.range(after.saturating_add(1)..).copied();
        let page: Vec<_> = it.by_ref().take(limit).collect();
        (page, it.next().is_some())
    }

    /// A user's read marker in a chat (0 for none).
    pub fn read_marker(&self, user: UserId, chat: ChatId) -> u64 {
        self.users
            .get(&user)
            .and_then(|u| u.read.get(&chat).copied())
            .unwrap_or(0)
    }

    /// Where events `from..=to` of a user's own log live.
    pub fn user_events(&self, user: UserId, from: u64, to: u64) -> Option<Vec<(u64, EventLoc)>> {
        let u = self.users.get(&user)?;
        let to = to.min(u.log.len() as u64);
        Some(
            (from.max(u.log.first_seq())..=to)
                .filter_map(|s| u.log.get(s as usize - 1).map(|l| (s, *l)))
                .collect(),
        )
    }

    /// Counts of users and chats (for status output).
    pub fn counts(&self) -> (usize, usize) {
        (self.users.len(), self.chats.len())
    }
}

/// What the rules need of a post: everything but its bytes, so the state machine can
/// apply a post without building its text (`DecodedBatch::post_fields`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostFields {
    /// The chat.
    pub chat: ChatId,
    /// The author.
    pub sender: UserId,
    /// The client's id for the message.
    pub client_message_id: u64,
    /// True when the post has text or media.
    pub has_body: bool,
    /// The seq replied to, 0 for none.
    pub reply_to: u64,
}

fn check_post(chat: &Chat, p: &PostFields) -> Result<(), Outcome> {
    let Some(role) = chat.members.get(&p.sender).map(|m| m.role) else {
        return Err(refuse(
            RefusalCode::PermissionDenied,
            format!("user {} is not a member of this chat", p.sender),
        ));
    };
    if chat.kind == ChatKind::Channel && role < Role::Admin {
        return Err(refuse(
            RefusalCode::PermissionDenied,
            "only admins post in a channel",
        ));
    }
    if p.client_message_id == 0 {
        return Err(refuse(
            RefusalCode::BadRequest,
            "client message id must not be 0",
        ));
    }
    if !p.has_body {
        return Err(refuse(
            RefusalCode::BadRequest,
            "a message needs text or media",
        ));
    }
    if p.reply_to > chat.events.len() as u64 {
        return Err(refuse(
            RefusalCode::NotFound,
            format!("no event at seq {} to reply to", p.reply_to),
        ));
    }
    Ok(())
}

/// Checks one chat command against the chat; on success returns the event kind and the
/// sender to record.
fn check_chat_command(chat: &Chat, cmd: &Command) -> Result<(EventKind, UserId), Outcome> {
    let role_of = |u: &UserId| chat.members.get(u).map(|m| m.role);
    let must_be_member = |u: &UserId| {
        role_of(u).ok_or_else(|| {
            refuse(
                RefusalCode::PermissionDenied,
                format!("user {u} is not a member of this chat"),
            )
        })
    };
    let must_be_admin = |u: &UserId| -> Result<Role, Outcome> {
        if chat.kind == ChatKind::Direct {
            return Err(refuse(
                RefusalCode::BadRequest,
                "a direct chat has no admins, invites or bans",
            ));
        }
        let r = must_be_member(u)?;
        if r < Role::Admin {
            return Err(refuse(
                RefusalCode::PermissionDenied,
                format!("user {u} is not an admin of this chat"),
            ));
        }
        Ok(r)
    };
    let message = |target: &u64| -> Result<&EventLoc, Outcome> {
        let loc = (*target >= 1)
            .then(|| chat.events.get(*target as usize - 1))
            .flatten()
            .filter(|l| l.kind() == EventKind::MessagePosted)
            .ok_or_else(|| refuse(RefusalCode::NotFound, format!("no message at seq {target}")))?;
        if loc.erased() {
            return Err(refuse(
                RefusalCode::NotFound,
                format!("the message at seq {target} was deleted"),
            ));
        }
        Ok(loc)
    };
    match cmd {
        Command::Invite { actor, user, .. } => {
            must_be_admin(actor)?;
            if chat.banned.contains(user) {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    format!("user {user} is banned from this chat"),
                ));
            }
            if *user == 0 {
                return Err(refuse(RefusalCode::BadRequest, "user id 0 is not a user"));
            }
            if role_of(user).is_some() {
                return Err(refuse(
                    RefusalCode::Conflict,
                    format!("user {user} is already a member"),
                ));
            }
            Ok((EventKind::MemberJoined, *actor))
        }
        Command::RemoveMember { actor, user, .. } | Command::Ban { actor, user, .. } => {
            let actor_role = must_be_admin(actor)?;
            let banning = matches!(cmd, Command::Ban { .. });
            match role_of(user) {
                Some(Role::Owner) => {
                    return Err(refuse(
                        RefusalCode::PermissionDenied,
                        "the owner cannot be removed or banned",
                    ));
                }
                Some(Role::Admin) if actor_role != Role::Owner => {
                    return Err(refuse(
                        RefusalCode::PermissionDenied,
                        "only the owner removes or bans an admin",
                    ));
                }
                None if !banning => {
                    return Err(refuse(
                        RefusalCode::NotFound,
                        format!("user {user} is not a member"),
                    ));
                }
                _ => {}
            }
            if banning && chat.banned.contains(user) {
                return Err(refuse(
                    RefusalCode::Conflict,
                    format!("user {user} is already banned"),
                ));
            }
            let kind = if banning {
                EventKind::MemberBanned
            } else {
                EventKind::MemberRemoved
            };
            Ok((kind, *actor))
        }
        Command::Leave { actor, .. } => {
            let r = must_be_member(actor)?;
            if chat.kind == ChatKind::Direct {
                return Err(refuse(
                    RefusalCode::BadRequest,
                    "nobody leaves a direct chat",
                ));
            }
            if r == Role::Owner {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    "the owner cannot leave the chat",
                ));
            }
            Ok((EventKind::MemberLeft, *actor))
        }
        Command::Unban { actor, user, .. } => {
            must_be_admin(actor)?;
            if !chat.banned.contains(user) {
                return Err(refuse(
                    RefusalCode::Conflict,
                    format!("user {user} is not banned"),
                ));
            }
            Ok((EventKind::MemberUnbanned, *actor))
        }
        Command::SetRole {
            actor, user, role, ..
        } => {
            if must_be_admin(actor)? != Role::Owner {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    "only the owner changes roles",
                ));
            }
            if *role == Role::Owner {
                return Err(refuse(
                    RefusalCode::BadRequest,
                    "ownership cannot be given away",
                ));
            }
            match role_of(user) {
                None => {
                    return Err(refuse(
                        RefusalCode::NotFound,
                        format!("user {user} is not a member"),
                    ));
                }
                Some(Role::Owner) => {
                    return Err(refuse(
                        RefusalCode::BadRequest,
                        "the owner's role cannot change",
                    ));
                }
                Some(r) if r == *role => {
                    return Err(refuse(
                        RefusalCode::Conflict,
                        format!("user {user} already has that role"),
                    ));
                }
                _ => {}
            }
            Ok((EventKind::RoleChanged, *actor))
        }
        Command::Join { actor, .. } => {
            if chat.kind != ChatKind::Channel {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    "only channels can be joined; groups need an invitation",
                ));
            }
            if chat.banned.contains(actor) {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    format!("user {actor} is banned from this chat"),
                ));
            }
            if role_of(actor).is_some() {
                return Err(refuse(
                    RefusalCode::Conflict,
                    format!("user {actor} is already a member"),
                ));
            }
            Ok((EventKind::MemberJoined, *actor))
        }
        Command::Post {
            sender,
            client_message_id,
            text,
            media,
            reply_to,
            ..
        } => check_post(
            chat,
            &PostFields {
                chat: 0,
                sender: *sender,
                client_message_id: *client_message_id,
                has_body: !text.is_empty() || media.is_some(),
                reply_to: *reply_to,
            },
        )
        .map(|()| (EventKind::MessagePosted, *sender)),
        Command::Edit {
            sender,
            target,
            text,
            ..
        } => {
            must_be_member(sender)?;
            let loc = message(target)?;
            if loc.sender != *sender {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    "only its sender edits a message",
                ));
            }
            if text.is_empty() {
                return Err(refuse(RefusalCode::BadRequest, "the new text is empty"));
            }
            Ok((EventKind::MessageEdited, *sender))
        }
        Command::Delete { sender, target, .. } => {
            let r = must_be_member(sender)?;
            let loc = message(target)?;
            if loc.sender != *sender && (chat.kind == ChatKind::Direct || r < Role::Admin) {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    "only its sender or an admin deletes a message",
                ));
            }
            Ok((EventKind::MessageDeleted, *sender))
        }
        Command::React {
            sender,
            target,
            reaction,
            ..
        } => {
            must_be_member(sender)?;
            message(target)?;
            if reaction.is_empty() {
                return Err(refuse(RefusalCode::BadRequest, "the reaction is empty"));
            }
            Ok((EventKind::ReactionChanged, *sender))
        }
        Command::Pin {
            sender,
            target,
            pin,
            ..
        } => {
            let r = must_be_member(sender)?;
            if chat.kind != ChatKind::Direct && r < Role::Admin {
                return Err(refuse(
                    RefusalCode::PermissionDenied,
                    "only admins pin in a group or channel",
                ));
            }
            message(target)?;
            if *pin == chat.pinned.contains(target) {
                let what = if *pin { "already" } else { "not" };
                return Err(refuse(
                    RefusalCode::Conflict,
                    format!("the message at seq {target} is {what} pinned"),
                ));
            }
            Ok((EventKind::PinChanged, *sender))
        }
        _ => Err(refuse(RefusalCode::BadRequest, "not a chat command")),
    }
}

// ---- checkpoint encoding -----------------------------------------------------------

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

// ---- s7raft: how event indexes are written in the checkpoint (`chat::index_chunks`) ----

/// Whose event index: a user's log or a chat's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexOwner {
    /// A user's own log.
    User(UserId),
    /// A chat's events.
    Chat(ChatId),
}

/// Writes and reads the kept locations of each event index inside the state's encoding
/// (the rest of the encoding does not change).
pub(crate) trait LocsCodec {
    /// Appends `index`'s kept locations for `owner`.
    fn write(&mut self, owner: IndexOwner, index: &EventIndex, out: &mut Vec<u8>);
    /// Reads back what `write` wrote: the kept locations, oldest first.
    fn read(&mut self, owner: IndexOwner, r: &mut Reader<'_>)
    -> Result<Vec<EventLoc>, DecodeError>;
    /// Bytes to reserve for an encoding of a state with `events` indexed events.
    fn capacity_hint(&self, events: u64) -> usize;
}

/// Every kept location in the encoding itself: `count u64 | count × (packed u64,
/// sender u64)` (the whole-state checkpoint and snapshot form).
struct WholeLocs;

impl LocsCodec for WholeLocs {
    fn write(&mut self, _owner: IndexOwner, index: &EventIndex, out: &mut Vec<u8>) {
        write_locs(out, index.kept());
    }
    fn read(
        &mut self,
        _owner: IndexOwner,
        r: &mut Reader<'_>,
    ) -> Result<Vec<EventLoc>, DecodeError> {
        read_locs(r)
    }
    fn capacity_hint(&self, events: u64) -> usize {
        events as usize * 16
    }
}

impl GroupState {
    /// Every event index in encoding order (users' logs by id, then chats' events by id).
    pub(crate) fn event_indexes(&self) -> impl Iterator<Item = (IndexOwner, &EventIndex)> {
        let users = self
            .users
            .iter()
            .map(|(id, u)| (IndexOwner::User(*id), &u.log));
        let chats = self
            .chats
            .iter()
            .map(|(id, c)| (IndexOwner::Chat(*id), &c.events));
        users.chain(chats)
    }
}

impl EventLoc {
    /// The location with its erased flag cleared (what an index chunk stores).
    pub(crate) fn unerased(self) -> EventLoc {
        EventLoc {
            packed: self.packed & !1,
            sender: self.sender,
        }
    }
}

/// Appends `count u64 | count × (packed u64, sender u64)`.
pub(crate) fn write_locs(out: &mut Vec<u8>, locs: &[EventLoc]) {
    out.extend_from_slice(&(locs.len() as u64).to_le_bytes());
    for l in locs {
        out.extend_from_slice(&l.packed.to_le_bytes());
        out.extend_from_slice(&l.sender.to_le_bytes());
    }
}

// ---- end s7raft ----

/// Reads what [`write_locs`] wrote, each location's kind checked.
pub(crate) fn read_locs(r: &mut Reader<'_>) -> Result<Vec<EventLoc>, DecodeError> {
    let n = r.u64()? as usize;
    if n.saturating_mul(16) > r.remaining() {
        return Err(DecodeError::new(
            "chat state",
            format!("{n} event locations exceed the bytes left"),
        ));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let packed = r.u64()?;
        let sender = r.u64()?;
        if EventKind::from_u8(((packed >> 1) & 0x7f) as u8).is_none() {
            return Err(DecodeError::new(
                "chat state",
                format!("event location {packed:#x} names no event kind"),
            ));
        }
        v.push(EventLoc { packed, sender });
    }
    Ok(v)
}

fn read_count(r: &mut Reader<'_>, item_bytes: usize) -> Result<usize, DecodeError> {
    let n = r.u64()? as usize;
    if n.saturating_mul(item_bytes) > r.remaining() {
        return Err(DecodeError::new(
            "chat state",
            format!("count {n} exceeds the bytes left"),
        ));
    }
    Ok(n)
}

fn read_hash(r: &mut Reader<'_>) -> Result<TokenHash, DecodeError> {
    let mut h = [0u8; 32];
    h.copy_from_slice(r.bytes(32)?);
    Ok(h)
}

impl GroupState {
    /// The whole state as checkpoint bytes (deterministic).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(&mut WholeLocs)
    }

    /// [`GroupState::encode`] with each event index's locations written by `locs`
    /// (s7raft: `chat::index_chunks` writes only the ones outside its chunks).
    pub(crate) fn encode_with(&self, locs: &mut dyn LocsCodec) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(
            64 + locs.capacity_hint(self.events_applied),
        ));
        w.u8(STATE_VERSION);
        w.u64(self.group);
        w.u64(self.next_user);
        w.u64(self.next_chat);
        w.u64(self.events_applied);
        w.u64(self.users.len() as u64);
        for (id, u) in &self.users {
            w.u64(*id);
            w.str(&u.name);
            w.0.extend_from_slice(&u.login_token_hash);
            w.u64(u.created_ms);
            w.u64(u.next_session);
            w.u64(u.sessions.len() as u64);
            for (sid, s) in &u.sessions {
                w.u64(*sid);
                w.str(&s.device_id);
                w.str(&s.device_name);
                w.0.extend_from_slice(&s.token_hash);
                w.u64(s.created_ms);
            }
            w.u64(u.chats.len() as u64);
            for c in &u.chats {
                w.u64(*c);
            }
            w.u64(u.read.len() as u64);
            for (c, s) in &u.read {
                w.u64(*c);
                w.u64(*s);
            }
            locs.write(IndexOwner::User(*id), &u.log, &mut w.0);
        }
        w.u64(self.chats.len() as u64);
        for (id, c) in &self.chats {
            w.u64(*id);
            w.u8(kind_byte(c.kind));
            w.str(&c.title);
            w.u64(c.created_ms);
            w.u64(c.members.len() as u64);
            for (u, m) in &c.members {
                w.u64(*u);
                w.u8(role_byte(m.role));
                w.u64(m.joined_seq);
            }
            w.u64(c.banned.len() as u64);
            for u in &c.banned {
                w.u64(*u);
            }
            w.u64(c.pinned.len() as u64);
            for s in &c.pinned {
                w.u64(*s);
            }
            locs.write(IndexOwner::Chat(*id), &c.events, &mut w.0);
            w.u64(c.edits.len() as u64);
            for (target, edits) in &c.edits {
                w.u64(*target);
                w.u64(edits.len() as u64);
                for e in edits {
                    w.u64(*e);
                }
            }
        }
        w.u64(self.dedupe.order.len() as u64);
        for (ts, k) in &self.dedupe.order {
            let (seq, _) = self
                .dedupe
                .get(k)
                .expect("every key in the order is mapped");
            w.u64(*ts);
            w.u64(k.chat);
            w.u64(k.sender);
            w.u64(k.client_message_id);
            w.u64(seq);
        }
        self.bots.encode_into(&mut w.0);
        self.secret.encode_into(&mut w.0);
        self.media.encode_into(&mut w.0);
        self.chat_lists.encode_into(&mut w.0);
        self.encode_retention(&mut w);
        // Last, and nothing outside group 0: older checkpoints decode unchanged.
        self.placement.encode_into(&mut w.0);
        // After the placement (s8retention): older checkpoints end before it.
        crate::chat::retention::encode_policy_section(self.retention_policy, &mut w.0);
        w.0
    }

    /// Decodes checkpoint bytes made by [`GroupState::encode`].
    pub fn decode(bytes: &[u8]) -> Result<GroupState, DecodeError> {
        Self::decode_with(bytes, &mut WholeLocs)
    }

    /// Decodes bytes made by [`GroupState::encode_with`] with the same kind of `locs`.
    pub(crate) fn decode_with(
        bytes: &[u8],
        locs: &mut dyn LocsCodec,
    ) -> Result<GroupState, DecodeError> {
        let mut r = Reader::new("chat state", bytes);
        let version = r.u8()?;
        if !(1..=STATE_VERSION).contains(&version) {
            return Err(DecodeError::new(
                "chat state",
                format!("version {version}, expected 1 to {STATE_VERSION}"),
            ));
        }
        let s = STATE_STRING_BYTES_MAX;
        let mut st = GroupState::new(r.u64()?);
        st.next_user = r.u64()?;
        st.next_chat = r.u64()?;
        st.events_applied = r.u64()?;
        for _ in 0..read_count(&mut r, 8)? {
            let id = r.u64()?;
            let name = r.string(s)?;
            let login_token_hash = read_hash(&mut r)?;
            let created_ms = r.u64()?;
            let next_session = r.u64()?;
            let mut sessions = BTreeMap::new();
            for _ in 0..read_count(&mut r, 8)? {
                let sid = r.u64()?;
                sessions.insert(
                    sid,
                    Session {
                        device_id: r.string(s)?,
                        device_name: r.string(s)?,
                        token_hash: read_hash(&mut r)?,
                        created_ms: r.u64()?,
                    },
                );
            }
            let mut chats = BTreeSet::new();
            for _ in 0..read_count(&mut r, 8)? {
                chats.insert(r.u64()?);
            }
            let mut read = BTreeMap::new();
            for _ in 0..read_count(&mut r, 16)? {
                read.insert(r.u64()?, r.u64()?);
            }
            let log = EventIndex::from_locs(locs.read(IndexOwner::User(id), &mut r)?);
            st.names.insert(name.clone(), id);
            st.users.insert(
                id,
                User {
                    name,
                    login_token_hash,
                    created_ms,
                    next_session,
                    sessions,
                    chats,
                    read,
                    log,
                },
            );
        }
        for _ in 0..read_count(&mut r, 8)? {
            let id = r.u64()?;
            let kind = kind_from(&mut r)?;
            let title = r.string(s)?;
            let created_ms = r.u64()?;
            let mut members = BTreeMap::new();
            for _ in 0..read_count(&mut r, 17)? {
                let u = r.u64()?;
                let role = role_from(&mut r)?;
                members.insert(
                    u,
                    MemberInfo {
                        role,
                        joined_seq: r.u64()?,
                    },
                );
            }
            let mut banned = BTreeSet::new();
            for _ in 0..read_count(&mut r, 8)? {
                banned.insert(r.u64()?);
            }
            let mut pinned = BTreeSet::new();
            for _ in 0..read_count(&mut r, 8)? {
                pinned.insert(r.u64()?);
            }
            let events = EventIndex::from_locs(locs.read(IndexOwner::Chat(id), &mut r)?);
            let mut edits = BTreeMap::new();
            if version >= 2 {
                for _ in 0..read_count(&mut r, 16)? {
                    let target = r.u64()?;
                    let list = (0..read_count(&mut r, 8)?)
                        .map(|_| r.u64())
                        .collect::<Result<Vec<u64>, _>>()?;
                    edits.insert(target, list);
                }
            }
            if kind == ChatKind::Direct {
                let ids: Vec<_> = members.keys().copied().collect();
                if let [a, b] = ids[..] {
                    st.directs.insert((a.min(b), a.max(b)), id);
                }
            }
            st.chats.insert(
                id,
                Chat {
                    kind,
                    title,
                    created_ms,
                    members,
                    banned,
                    pinned,
                    events,
                    edits,
                },
            );
        }
        for _ in 0..read_count(&mut r, 40)? {
            let ts = r.u64()?;
            let key = DedupeKey {
                chat: r.u64()?,
                sender: r.u64()?,
                client_message_id: r.u64()?,
            };
            let seq = r.u64()?;
            st.dedupe.restore(key, seq, ts);
        }
        // Checkpoints written before bots existed end here.
        if r.remaining() > 0 {
            st.bots = crate::chat::bot::Bots::decode(&mut r)?;
        }
        // Checkpoints written before secret chats existed end here.
        if r.remaining() > 0 {
            st.secret = SecretState::decode_from(&mut r)?;
        }
        // Checkpoints written before media existed end here.
        if r.remaining() > 0 {
            st.media = MediaState::decode_from(&mut r)?;
        }
        if version >= 2 {
            st.chat_lists = ChatLists::decode_from(&mut r)?;
        }
        st.decode_retention(&mut r)?;
        if r.peek_u8() != Some(crate::chat::retention::POLICY_SECTION_TAG) {
            st.placement = crate::chat::placement::Placement::decode(&mut r)?;
        }
        st.retention_policy = crate::chat::retention::decode_policy_section(&mut r)?;
        r.finish()?;
        Ok(st)
    }
}

// ---- retention (s5retain; rules in chat/retention.rs) ----

/// Tag of the retention section of the encoded state, written just before the placement
/// and only once something was trimmed (a state that never trimmed encodes as before).
/// Never equal to `placement::PLACEMENT_VERSION`, the byte that may follow instead.
const RETENTION_SECTION_TAG: u8 = 0xE7;
const _: () = assert!(RETENTION_SECTION_TAG != crate::chat::placement::PLACEMENT_VERSION);

impl GroupState {
    /// Drops the index entries of events that live below Raft index `horizon`, in every
    /// chat and user log (history below it is no longer served). Deterministic: apply
    /// calls it at the entries `RetentionPolicy::trim_at` names.
    pub fn trim_below(&mut self, horizon: u64) {
        if horizon <= self.retained_from {
            return;
        }
        self.retained_from = horizon;
        for c in self.chats.values_mut() {
            c.events.trim_below(horizon);
        }
        for u in self.users.values_mut() {
            u.log.trim_below(horizon);
        }
    }

    /// Records an applied entry (`bytes` long) under the group's replicated policy and
    /// trims where it says (`RetentionPolicy::note_entry`); nothing without a policy.
    /// Apply calls it for every entry, after the entry's commands (so an entry that sets
    /// a policy is itself counted under it).
    pub fn note_applied_entry(&mut self, raft_index: u64, bytes: u64) {
        let Some(policy) = self.retention_policy.filter(|p| p.is_some()) else {
            return;
        };
        if let Some(horizon) = policy.note_entry(&mut self.ledger, raft_index, bytes) {
            self.trim_below(horizon);
        }
    }

    /// The group's replicated retention policy; `None` while none was ever set (the
    /// group keeps everything).
    pub fn retention_policy(&self) -> Option<crate::chat::retention::RetentionPolicy> {
        self.retention_policy
    }

    /// Applies a [`crate::chat::retention::RetentionCommand`]. A policy without a byte
    /// limit clears the byte ledger, so a later byte limit counts from where it is set
    /// (the same on every replica). A looser policy keeps what was already trimmed.
    fn apply_retention(&mut self, c: &crate::chat::retention::RetentionCommand) -> Outcome {
        if let Some(why) = c.policy.invalid() {
            return refuse(RefusalCode::BadRequest, why);
        }
        let changed = match self.retention_policy {
            Some(_) if c.only_if_unset => false,
            Some(p) => p != c.policy,
            None => true,
        };
        if changed {
            self.retention_policy = Some(c.policy);
            if c.policy.retain_bytes.is_none() {
                self.ledger = Default::default();
            }
        }
        Outcome::Retention { changed }
    }

    /// The Raft index below which no index entry points (0: nothing trimmed).
    pub fn retained_from(&self) -> u64 {
        self.retained_from
    }

    /// The first seq of `chat` whose location is still held (1 if nothing was trimmed;
    /// the head + 1 if every event was), `None` if there is no such chat.
    pub fn chat_first_seq(&self, chat: ChatId) -> Option<u64> {
        self.chats.get(&chat).map(|c| c.events.first_seq())
    }

    fn encode_retention(&self, w: &mut W) {
        if self.retained_from == 0 && self.ledger.is_empty() {
            return;
        }
        w.u8(RETENTION_SECTION_TAG);
        w.u64(self.retained_from);
        let chats: Vec<_> = self
            .chats
            .iter()
            .filter(|(_, c)| c.events.base() > 0)
            .collect();
        w.u64(chats.len() as u64);
        for (id, c) in chats {
            w.u64(*id);
            w.u64(c.events.base());
        }
        let users: Vec<_> = self
            .users
            .iter()
            .filter(|(_, u)| u.log.base() > 0)
            .collect();
        w.u64(users.len() as u64);
        for (id, u) in users {
            w.u64(*id);
            w.u64(u.log.base());
        }
        self.ledger.encode_into(&mut w.0);
    }

    fn decode_retention(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        if r.peek_u8() != Some(RETENTION_SECTION_TAG) {
            return Ok(());
        }
        r.u8()?;
        self.retained_from = r.u64()?;
        for _ in 0..read_count(r, 16)? {
            let (id, base) = (r.u64()?, r.u64()?);
            let c = self
                .chats
                .get_mut(&id)
                .ok_or_else(|| r.error(format!("retention names unknown chat {id}")))?;
            c.events.set_base(base);
        }
        for _ in 0..read_count(r, 16)? {
            let (id, base) = (r.u64()?, r.u64()?);
            let u = self
                .users
                .get_mut(&id)
                .ok_or_else(|| r.error(format!("retention names unknown user {id}")))?;
            u.log.set_base(base);
        }
        self.ledger = crate::chat::retention::ByteLedger::decode_from(r)?;
        Ok(())
    }
}

#[cfg(test)]
mod dedupe_tests {
    use super::*;

    fn key(n: u64) -> DedupeKey {
        DedupeKey {
            chat: 65537 + n % 7,
            sender: 65537 + n % 3,
            client_message_id: n,
        }
    }

    /// Restores `d`'s live sends into a new map, as a checkpoint's decoding does.
    fn restored(d: &Dedupe) -> Dedupe {
        let mut r = Dedupe::default();
        for (ts, k) in &d.order {
            let (seq, _) = d.get(k).expect("live keys are mapped");
            r.restore(*k, seq, *ts);
        }
        r
    }

    #[test]
    fn past_the_cap_the_oldest_are_forgotten_and_the_maps_stay_bounded() {
        let mut d = Dedupe::default();
        let extra = 10_000;
        let total = (DEDUPE_ENTRIES_MAX + extra) as u64;
        for n in 0..total {
            d.insert(key(n), n + 1, 1_000 + n);
        }
        assert_eq!(d.order.len(), DEDUPE_ENTRIES_MAX);
        for n in (0..extra as u64).step_by(97) {
            assert_eq!(d.get(&key(n)), None, "key {n} was evicted");
        }
        for n in (extra as u64..total).step_by(89) {
            assert_eq!(d.get(&key(n)), Some((n + 1, 1_000 + n)), "key {n} is live");
        }
        // Evicted keys are swept in batches: the maps never hold much more than the live.
        let held: usize = d.seqs.iter().map(HashMap::len).sum();
        assert!(
            held <= DEDUPE_ENTRIES_MAX * 5 / 4 + DEDUPE_SHARDS,
            "{held} entries held for {DEDUPE_ENTRIES_MAX} live"
        );
        // A replica restored from a checkpoint holds no evicted keys and is equal.
        let r = restored(&d);
        assert_eq!(
            r.seqs.iter().map(HashMap::len).sum::<usize>(),
            DEDUPE_ENTRIES_MAX
        );
        assert!(r == d, "a restored map equals the one that evicted");
        // An evicted key sent again is a new send.
        d.insert(key(0), total + 1, 1_000 + total);
        assert_eq!(d.get(&key(0)), Some((total + 1, 1_000 + total)));
        assert!(r != d);
    }

    #[test]
    fn sends_older_than_the_window_are_forgotten() {
        let mut d = Dedupe::default();
        for n in 0..100 {
            d.insert(key(n), n + 1, n);
        }
        // A send past the window of the first fifty.
        d.insert(key(100), 101, 50 + DEDUPE_WINDOW_MS);
        for n in 0..50 {
            assert_eq!(d.get(&key(n)), None, "key {n} is older than the window");
        }
        for n in 50..=100 {
            assert!(d.get(&key(n)).is_some(), "key {n} is within the window");
        }
        assert!(restored(&d) == d);
    }
}
