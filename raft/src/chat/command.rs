//! Chat commands and their bytes: what one Raft entry carries and what applying each
//! command answered.
//!
//! What it owns: the command vocabulary, the batch encoding (the `ChatBatch` payload, so
//! the bytes written to the Raft log are these) and the per-command outcome. What it
//! must not do: decide anything; `state.rs` applies.
//!
//! Batch bytes, little-endian:
//!
//! ```text
//! version u8 (= BATCH_VERSION) | timestamp_ms u64 | count u32
//! count × ( len u32 | command bytes (tag u8, fields) )
//! ```
//!
//! Each command is length-prefixed so a reader can reach the command at position `p`
//! (the per-chat index stores `(raft index, p)`) without decoding the ones before it.
//! Strings are a u32 length then UTF-8; ids are u64.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chat::secret::{SecretApplied, SecretCommand};
use crate::chat::{ChatId, UserId};
use crate::codec::{DecodeError, Reader};

/// Version byte of the batch encoding.
pub const BATCH_VERSION: u8 = 1;
/// Bytes before the first command of a batch.
pub const BATCH_HEADER_BYTES: usize = 1 + 8 + 4;
/// Commands one batch may carry (positions fit the per-chat index's 16 bits).
pub const BATCH_COMMANDS_MAX: usize = 1 << 16;
/// Longest string any command field may hold when decoded (the gateway enforces the
/// protocol's tighter per-field limits before proposing).
pub const COMMAND_STRING_BYTES_MAX: usize = 64 * 1024;
/// Most initial members a create-chat command names.
pub const CREATE_MEMBERS_MAX: usize = 1024;
/// Bytes of a token hash (SHA-256 size; the hash itself is computed by the gateway).
pub const TOKEN_HASH_BYTES: usize = 32;

/// A hash of a secret token. Only hashes enter the log.
pub type TokenHash = [u8; TOKEN_HASH_BYTES];

/// The kind of a chat, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChatKind {
    /// Two users, both members, no roles.
    Direct,
    /// Many members who all post.
    Group,
    /// Only admins post; members are subscribers.
    Channel,
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads and (in a group) posts.
    Member,
    /// Also invites, removes, bans, pins, deletes others' messages, posts in a channel.
    Admin,
    /// Also changes roles; the creator.
    Owner,
}

/// A reference to an uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRef {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Size in bytes.
    pub size_bytes: u64,
    /// MIME type.
    pub mime_type: String,
    /// File name for people.
    pub file_name: String,
}

/// One chat command. `actor`/`sender`/`creator`/`user` fields are the authenticated
/// user the gateway acts for; the state machine checks their rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Creates a user with a unique handle (in the handle's group, `group_of_name`).
    CreateUser {
        /// The handle.
        name: String,
        /// Hash of the login token handed to the creator.
        login_token_hash: TokenHash,
    },
    /// Opens a session for a device, if the login token matches.
    Login {
        /// Who logs in.
        user: UserId,
        /// Hash of the login token presented.
        login_token_hash: TokenHash,
        /// The device's id; a new login from it replaces its earlier session.
        device_id: String,
        /// A name for people.
        device_name: String,
        /// Hash of the new session's token.
        session_token_hash: TokenHash,
    },
    /// Ends a session.
    RevokeSession {
        /// Whose.
        user: UserId,
        /// Which.
        session_id: u64,
    },
    /// Creates a chat; its first event (seq 1) is `ChatCreated`.
    CreateChat {
        /// The creator (owner of a group or channel).
        creator: UserId,
        /// Its kind.
        kind: ChatKind,
        /// Its title (empty for a direct chat).
        title: String,
        /// Initial members besides the creator.
        members: Vec<UserId>,
    },
    /// Adds a user to a group or channel (admin).
    Invite {
        /// The chat.
        chat: ChatId,
        /// Who invites.
        actor: UserId,
        /// Who is added.
        user: UserId,
    },
    /// Removes a member (admin).
    RemoveMember {
        /// The chat.
        chat: ChatId,
        /// Who removes.
        actor: UserId,
        /// Who is removed.
        user: UserId,
    },
    /// The actor leaves.
    Leave {
        /// The chat.
        chat: ChatId,
        /// Who leaves.
        actor: UserId,
    },
    /// Bans a user (admin); removes them if a member.
    Ban {
        /// The chat.
        chat: ChatId,
        /// Who bans.
        actor: UserId,
        /// Who is banned.
        user: UserId,
    },
    /// Lifts a ban (admin).
    Unban {
        /// The chat.
        chat: ChatId,
        /// Who lifts it.
        actor: UserId,
        /// Whose ban.
        user: UserId,
    },
    /// Changes a member's role (owner).
    SetRole {
        /// The chat.
        chat: ChatId,
        /// The owner.
        actor: UserId,
        /// The member.
        user: UserId,
        /// Member or admin.
        role: Role,
    },
    /// The actor subscribes to a channel.
    Join {
        /// The channel.
        chat: ChatId,
        /// Who joins.
        actor: UserId,
    },
    /// Posts a message; de-duplicated by `(chat, sender, client_message_id)`.
    Post {
        /// The chat.
        chat: ChatId,
        /// The author.
        sender: UserId,
        /// The client's id for this message (non-zero).
        client_message_id: u64,
        /// The text.
        text: String,
        /// An attached file.
        media: Option<MediaRef>,
        /// The seq replied to, 0 for none.
        reply_to: u64,
    },
    /// Replaces a message's text (its sender only).
    Edit {
        /// The chat.
        chat: ChatId,
        /// Who edits.
        sender: UserId,
        /// The message's seq.
        target: u64,
        /// The new text.
        text: String,
    },
    /// Deletes a message (its sender, or an admin).
    Delete {
        /// The chat.
        chat: ChatId,
        /// Who deletes.
        sender: UserId,
        /// The message's seq.
        target: u64,
    },
    /// Adds or removes the sender's reaction.
    React {
        /// The chat.
        chat: ChatId,
        /// Whose reaction.
        sender: UserId,
        /// The message's seq.
        target: u64,
        /// The reaction.
        reaction: String,
        /// Add (true) or remove.
        add: bool,
    },
    /// Pins or unpins a message (admin; any member of a direct chat).
    Pin {
        /// The chat.
        chat: ChatId,
        /// Who pins.
        sender: UserId,
        /// The message's seq.
        target: u64,
        /// Pin (true) or unpin.
        pin: bool,
    },
    /// Moves a user's read marker forward (in the user's group).
    MarkRead {
        /// Whose marker.
        user: UserId,
        /// The chat.
        chat: ChatId,
        /// The highest seq read.
        seq: u64,
    },
    /// Records in the user's own state that they are now in a chat (in the user's group).
    UserChatAdded {
        /// The user.
        user: UserId,
        /// The chat.
        chat: ChatId,
    },
    /// Records in the user's own state that they left a chat (in the user's group).
    UserChatRemoved {
        /// The user.
        user: UserId,
        /// The chat.
        chat: ChatId,
    },
    /// Membership changes from group `source`'s chat-list outbox, applied to the lists of
    /// this group's users in order, each at most once (`chat_lists.rs`). At most one
    /// record per user and `DELIVERY_RECORDS_MAX` in all.
    ChatListDelivery {
        /// The chats' group.
        source: crate::types::GroupId,
        /// The records, in number order.
        records: Vec<crate::chat::chat_lists::ChatListRecord>,
    },
    /// Drops this group's chat-list outbox records up to `upto`: delivered.
    ChatListAcked {
        /// The last record delivered.
        upto: u64,
    },
    /// Bot accounts and their update cursors (tags 60-69, `bot.rs`).
    Bot(crate::chat::bot::BotCommand),
    // ---- secret chats (tags 50-59, `secret.rs`) ----
    /// A secret-chat command.
    Secret(SecretCommand),
    // ---- cluster placement (controller group 0 only; tags 70-79) ----
    /// A change to the cluster placement (`chat::placement`); refused outside group 0.
    Placement(crate::chat::placement::PlacementCommand),
    // ---- retention policy (s8retention; tags 80-84, `chat::retention`) ----
    /// Sets the group's retention policy (replicated state; `chat/retention.rs`).
    Retention(crate::chat::retention::RetentionCommand),
    /// Records that `uploader` finished uploading a file, checked and stored by the node
    /// that proposes it (in the uploader's group; `chat/media.rs`).
    MediaStored {
        /// Who uploaded it.
        uploader: UserId,
        /// The file.
        media: MediaRef,
    },
}

mod tag {
    pub const CREATE_USER: u8 = 1;
    pub const LOGIN: u8 = 2;
    pub const REVOKE_SESSION: u8 = 3;
    pub const CREATE_CHAT: u8 = 10;
    pub const INVITE: u8 = 11;
    pub const REMOVE_MEMBER: u8 = 12;
    pub const LEAVE: u8 = 13;
    pub const BAN: u8 = 14;
    pub const UNBAN: u8 = 15;
    pub const SET_ROLE: u8 = 16;
    pub const JOIN: u8 = 17;
    pub const POST: u8 = 20;
    pub const EDIT: u8 = 21;
    pub const DELETE: u8 = 22;
    pub const REACT: u8 = 23;
    pub const PIN: u8 = 24;
    pub const MARK_READ: u8 = 30;
    pub const USER_CHAT_ADDED: u8 = 31;
    pub const USER_CHAT_REMOVED: u8 = 32;
    pub const CHAT_LIST_DELIVERY: u8 = 33;
    pub const CHAT_LIST_ACKED: u8 = 34;
    pub const PLACEMENT: u8 = 70;
    // Media: 40-49.
    pub const MEDIA_STORED: u8 = 40;
}

/// Where the text of a post or an edit lies in the command's bytes (tag first, as
/// [`Command::encode_into`] writes them): `(offset, length)`, or `None` for any other
/// command or bytes too short. The eraser zeroes exactly this span when a message is
/// deleted, so the entry keeps its length and every position in it stays valid.
pub fn message_text_span(command: &[u8]) -> Option<(usize, usize)> {
    // post: tag | chat | sender | client message id | reply to | text len u32 | text …
    // edit: tag | chat | sender | target | text len u32 | text
    let len_at = match *command.first()? {
        tag::POST => 1 + 8 * 4,
        tag::EDIT => 1 + 8 * 3,
        _ => return None,
    };
    let len = u32::from_le_bytes(command.get(len_at..len_at + 4)?.try_into().ok()?) as usize;
    let at = len_at + 4;
    (command.len() >= at.checked_add(len)?).then_some((at, len))
}

impl Command {
    /// The chat the command appends to, if it is a chat command on an existing chat.
    pub fn chat(&self) -> Option<ChatId> {
        match self {
            Command::Invite { chat, .. }
            | Command::RemoveMember { chat, .. }
            | Command::Leave { chat, .. }
            | Command::Ban { chat, .. }
            | Command::Unban { chat, .. }
            | Command::SetRole { chat, .. }
            | Command::Join { chat, .. }
            | Command::Post { chat, .. }
            | Command::Edit { chat, .. }
            | Command::Delete { chat, .. }
            | Command::React { chat, .. }
            | Command::Pin { chat, .. } => Some(*chat),
            _ => None,
        }
    }

    /// Appends the command's bytes (tag and fields, without the length prefix).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Command::CreateUser {
                name,
                login_token_hash,
            } => {
                w.u8(tag::CREATE_USER);
                w.str(name);
                w.raw(login_token_hash);
            }
            Command::Login {
                user,
                login_token_hash,
                device_id,
                device_name,
                session_token_hash,
            } => {
                w.u8(tag::LOGIN);
                w.u64(*user);
                w.raw(login_token_hash);
                w.str(device_id);
                w.str(device_name);
                w.raw(session_token_hash);
            }
            Command::RevokeSession { user, session_id } => {
                w.u8(tag::REVOKE_SESSION);
                w.u64(*user);
                w.u64(*session_id);
            }
            Command::CreateChat {
                creator,
                kind,
                title,
                members,
            } => {
                w.u8(tag::CREATE_CHAT);
                w.u64(*creator);
                w.u8(kind_byte(*kind));
                w.str(title);
                w.u32(members.len() as u32);
                for m in members {
                    w.u64(*m);
                }
            }
            Command::Invite { chat, actor, user } => w.three(tag::INVITE, *chat, *actor, *user),
            Command::RemoveMember { chat, actor, user } => {
                w.three(tag::REMOVE_MEMBER, *chat, *actor, *user)
            }
            Command::Leave { chat, actor } => {
                w.u8(tag::LEAVE);
                w.u64(*chat);
                w.u64(*actor);
            }
            Command::Ban { chat, actor, user } => w.three(tag::BAN, *chat, *actor, *user),
            Command::Unban { chat, actor, user } => w.three(tag::UNBAN, *chat, *actor, *user),
            Command::SetRole {
                chat,
                actor,
                user,
                role,
            } => {
                w.three(tag::SET_ROLE, *chat, *actor, *user);
                w.u8(role_byte(*role));
            }
            Command::Join { chat, actor } => {
                w.u8(tag::JOIN);
                w.u64(*chat);
                w.u64(*actor);
            }
            Command::Post {
                chat,
                sender,
                client_message_id,
                text,
                media,
                reply_to,
            } => {
                w.three(tag::POST, *chat, *sender, *client_message_id);
                w.u64(*reply_to);
                w.str(text);
                match media {
                    None => w.u8(0),
                    Some(m) => {
                        w.u8(1);
                        w.raw(&m.sha256);
                        w.u64(m.size_bytes);
                        w.str(&m.mime_type);
                        w.str(&m.file_name);
                    }
                }
            }
            Command::Edit {
                chat,
                sender,
                target,
                text,
            } => {
                w.three(tag::EDIT, *chat, *sender, *target);
                w.str(text);
            }
            Command::Delete {
                chat,
                sender,
                target,
            } => w.three(tag::DELETE, *chat, *sender, *target),
            Command::React {
                chat,
                sender,
                target,
                reaction,
                add,
            } => {
                w.three(tag::REACT, *chat, *sender, *target);
                w.str(reaction);
                w.u8(u8::from(*add));
            }
            Command::Pin {
                chat,
                sender,
                target,
                pin,
            } => {
                w.three(tag::PIN, *chat, *sender, *target);
                w.u8(u8::from(*pin));
            }
            Command::MarkRead { user, chat, seq } => w.three(tag::MARK_READ, *user, *chat, *seq),
            Command::UserChatAdded { user, chat } => {
                w.u8(tag::USER_CHAT_ADDED);
                w.u64(*user);
                w.u64(*chat);
            }
            Command::UserChatRemoved { user, chat } => {
                w.u8(tag::USER_CHAT_REMOVED);
                w.u64(*user);
                w.u64(*chat);
            }
            Command::ChatListDelivery { source, records } => {
                w.u8(tag::CHAT_LIST_DELIVERY);
                w.u64(*source);
                w.u64(records.len() as u64);
                for r in records {
                    r.encode_into(w.0);
                }
            }
            Command::ChatListAcked { upto } => {
                w.u8(tag::CHAT_LIST_ACKED);
                w.u64(*upto);
            }
            Command::Bot(c) => c.encode_into(w.0),
            Command::Secret(c) => c.encode_into(w.0),
            Command::Placement(p) => {
                w.u8(tag::PLACEMENT);
                p.encode_into(w.0);
            }
            Command::Retention(c) => c.encode_into(w.0),
            Command::MediaStored { uploader, media } => {
                w.u8(tag::MEDIA_STORED);
                w.u64(*uploader);
                w.raw(&media.sha256);
                w.u64(media.size_bytes);
                w.str(&media.mime_type);
                w.str(&media.file_name);
            }
        }
    }

    /// Decodes one command's bytes (as written by [`Command::encode_into`]).
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        let mut r = Reader::new("chat command", bytes);
        let s = COMMAND_STRING_BYTES_MAX;
        let cmd = match r.u8()? {
            tag::CREATE_USER => Command::CreateUser {
                name: r.string(s)?,
                login_token_hash: hash(&mut r)?,
            },
            tag::LOGIN => Command::Login {
                user: r.u64()?,
                login_token_hash: hash(&mut r)?,
                device_id: r.string(s)?,
                device_name: r.string(s)?,
                session_token_hash: hash(&mut r)?,
            },
            tag::REVOKE_SESSION => Command::RevokeSession {
                user: r.u64()?,
                session_id: r.u64()?,
            },
            tag::CREATE_CHAT => {
                let creator = r.u64()?;
                let kind = kind_from(&mut r)?;
                let title = r.string(s)?;
                let n = r.item_count(8, CREATE_MEMBERS_MAX)?;
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    members.push(r.u64()?);
                }
                Command::CreateChat {
                    creator,
                    kind,
                    title,
                    members,
                }
            }
            tag::INVITE => Command::Invite {
                chat: r.u64()?,
                actor: r.u64()?,
                user: r.u64()?,
            },
            tag::REMOVE_MEMBER => Command::RemoveMember {
                chat: r.u64()?,
                actor: r.u64()?,
                user: r.u64()?,
            },
            tag::LEAVE => Command::Leave {
                chat: r.u64()?,
                actor: r.u64()?,
            },
            tag::BAN => Command::Ban {
                chat: r.u64()?,
                actor: r.u64()?,
                user: r.u64()?,
            },
            tag::UNBAN => Command::Unban {
                chat: r.u64()?,
                actor: r.u64()?,
                user: r.u64()?,
            },
            tag::SET_ROLE => Command::SetRole {
                chat: r.u64()?,
                actor: r.u64()?,
                user: r.u64()?,
                role: role_from(&mut r)?,
            },
            tag::JOIN => Command::Join {
                chat: r.u64()?,
                actor: r.u64()?,
            },
            tag::POST => {
                let chat = r.u64()?;
                let sender = r.u64()?;
                let client_message_id = r.u64()?;
                let reply_to = r.u64()?;
                let text = r.string(s)?;
                let media = if r.bool()? {
                    Some(MediaRef {
                        sha256: hash(&mut r)?,
                        size_bytes: r.u64()?,
                        mime_type: r.string(s)?,
                        file_name: r.string(s)?,
                    })
                } else {
                    None
                };
                Command::Post {
                    chat,
                    sender,
                    client_message_id,
                    text,
                    media,
                    reply_to,
                }
            }
            tag::EDIT => Command::Edit {
                chat: r.u64()?,
                sender: r.u64()?,
                target: r.u64()?,
                text: r.string(s)?,
            },
            tag::DELETE => Command::Delete {
                chat: r.u64()?,
                sender: r.u64()?,
                target: r.u64()?,
            },
            tag::REACT => Command::React {
                chat: r.u64()?,
                sender: r.u64()?,
                target: r.u64()?,
                reaction: r.string(s)?,
                add: r.bool()?,
            },
            tag::PIN => Command::Pin {
                chat: r.u64()?,
                sender: r.u64()?,
                target: r.u64()?,
                pin: r.bool()?,
            },
            tag::MARK_READ => Command::MarkRead {
                user: r.u64()?,
                chat: r.u64()?,
                seq: r.u64()?,
            },
            tag::USER_CHAT_ADDED => Command::UserChatAdded {
                user: r.u64()?,
                chat: r.u64()?,
            },
            tag::USER_CHAT_REMOVED => Command::UserChatRemoved {
                user: r.u64()?,
                chat: r.u64()?,
            },
            tag::CHAT_LIST_DELIVERY => {
                use crate::chat::chat_lists::{self as lists, ChatListRecord};
                let source = r.u64()?;
                let n = r.u64_count(lists::RECORD_BYTES, lists::DELIVERY_RECORDS_MAX)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(ChatListRecord::decode(&mut r)?);
                }
                Command::ChatListDelivery { source, records }
            }
            tag::CHAT_LIST_ACKED => Command::ChatListAcked { upto: r.u64()? },
            t if crate::chat::bot::tag::RANGE.contains(&t) => {
                Command::Bot(crate::chat::bot::BotCommand::decode(t, &mut r)?)
            }
            t if SecretCommand::owns_tag(t) => {
                Command::Secret(SecretCommand::decode_fields(t, &mut r)?)
            }
            tag::PLACEMENT => {
                Command::Placement(crate::chat::placement::PlacementCommand::decode(&mut r)?)
            }
            t if crate::chat::retention::tag::RANGE.contains(&t) => Command::Retention(
                crate::chat::retention::RetentionCommand::decode_fields(t, &mut r)?,
            ),
            tag::MEDIA_STORED => Command::MediaStored {
                uploader: r.u64()?,
                media: MediaRef {
                    sha256: hash(&mut r)?,
                    size_bytes: r.u64()?,
                    mime_type: r.string(s)?,
                    file_name: r.string(s)?,
                },
            },
            other => {
                return Err(DecodeError::new(
                    "chat command",
                    format!("unknown command tag {other}"),
                ));
            }
        };
        r.finish()?;
        Ok(cmd)
    }
}

/// A batch of commands as proposed: the payload of one Raft entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The proposer's clock when the batch was formed; every event it creates carries it.
    pub timestamp_ms: u64,
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

impl Batch {
    /// Encodes the batch.
    pub fn encode(&self) -> Bytes {
        let encoded: Vec<Vec<u8>> = self
            .commands
            .iter()
            .map(|c| {
                let mut v = Vec::new();
                c.encode_into(&mut v);
                v
            })
            .collect();
        Batch::encode_encoded(self.timestamp_ms, &encoded)
    }

    /// Encodes a batch from commands already encoded with [`Command::encode_into`]
    /// (proposers encode each command once, when it is queued).
    pub fn encode_encoded<C: AsRef<[u8]>>(timestamp_ms: u64, commands: &[C]) -> Bytes {
        let body: usize = commands.iter().map(|c| 4 + c.as_ref().len()).sum();
        let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + body);
        out.push(BATCH_VERSION);
        out.extend_from_slice(&timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(commands.len() as u32).to_le_bytes());
        for c in commands {
            let c = c.as_ref();
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(c);
        }
        Bytes::from(out)
    }
}

/// A batch whose frame was checked; commands are decoded on demand.
#[derive(Debug, Clone)]
pub struct DecodedBatch {
    /// The batch's timestamp.
    pub timestamp_ms: u64,
    /// Each command's byte range in `bytes`.
    ranges: Vec<(u32, u32)>,
    bytes: Bytes,
}

impl DecodedBatch {
    /// Checks the batch frame (version, count, every length prefix).
    pub fn parse(bytes: Bytes) -> Result<DecodedBatch, DecodeError> {
        let mut r = Reader::new("chat batch", &bytes);
        let version = r.u8()?;
        if version != BATCH_VERSION {
            return Err(DecodeError::new(
                "chat batch",
                format!("version {version}, expected {BATCH_VERSION}"),
            ));
        }
        let timestamp_ms = r.u64()?;
        let n = r.item_count(4, BATCH_COMMANDS_MAX)?;
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r.u32()? as usize;
            let start = bytes.len() - r.remaining();
            r.bytes(len)?;
            ranges.push((start as u32, (start + len) as u32));
        }
        r.finish()?;
        Ok(DecodedBatch {
            timestamp_ms,
            ranges,
            bytes,
        })
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when the batch carries no command.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The fields the rules need of the command at `pos` if it is a post, read in place
    /// (no text is copied); `None` for another kind or bytes that do not decode as a
    /// post (the caller then decodes the whole command, which reports the error).
    pub fn post_fields(&self, pos: usize) -> Option<crate::chat::state::PostFields> {
        let (a, b) = *self.ranges.get(pos)?;
        let bytes = &self.bytes[a as usize..b as usize];
        let mut r = Reader::new("chat command", bytes);
        if r.u8().ok()? != tag::POST {
            return None;
        }
        let chat = r.u64().ok()?;
        let sender = r.u64().ok()?;
        let client_message_id = r.u64().ok()?;
        let reply_to = r.u64().ok()?;
        let text = r.len_prefixed(COMMAND_STRING_BYTES_MAX).ok()?;
        std::str::from_utf8(text).ok()?;
        let has_media = r.bool().ok()?;
        if has_media {
            // A post with media also grants the chat's members read access to it
            // (`chat/media.rs`): the full decode path applies it.
            return None;
        }
        r.finish().ok()?;
        Some(crate::chat::state::PostFields {
            chat,
            sender,
            client_message_id,
            has_body: !text.is_empty() || has_media,
            reply_to,
        })
    }

    /// The bytes of the command at `pos` (tag and fields).
    pub fn command_bytes(&self, pos: usize) -> Option<&[u8]> {
        let (a, b) = *self.ranges.get(pos)?;
        Some(&self.bytes[a as usize..b as usize])
    }

    /// Where the command at `pos` starts in the batch bytes.
    pub fn command_offset(&self, pos: usize) -> Option<usize> {
        self.ranges.get(pos).map(|(a, _)| *a as usize)
    }

    /// Decodes the command at `pos`.
    pub fn command(&self, pos: usize) -> Result<Command, DecodeError> {
        let (a, b) = *self.ranges.get(pos).ok_or_else(|| {
            DecodeError::new(
                "chat batch",
                format!("no command at position {pos} of {}", self.ranges.len()),
            )
        })?;
        Command::decode(&self.bytes[a as usize..b as usize])
    }
}

/// Why a command was refused. Mirrors the protocol's error codes the state machine can
/// produce; the gateway maps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// A field is invalid.
    BadRequest,
    /// Credentials do not match.
    Unauthenticated,
    /// The actor may not do this.
    PermissionDenied,
    /// The user, chat or seq does not exist.
    NotFound,
    /// The request contradicts the state (name taken, already a member, …).
    Conflict,
}

/// A refused command: nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The kind of refusal.
    pub code: RefusalCode,
    /// What was refused and why, for people.
    pub message: String,
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A chat event was appended (or, for a duplicate post, had been).
    Event {
        /// The chat.
        chat: ChatId,
        /// The event's seq.
        seq: u64,
        /// Its timestamp.
        timestamp_ms: u64,
        /// True when this was a retried post: nothing new was appended.
        deduplicated: bool,
    },
    /// A user was created.
    UserCreated {
        /// The new user's id.
        user: UserId,
    },
    /// A session was opened.
    LoggedIn {
        /// The user.
        user: UserId,
        /// The new session's id.
        session_id: u64,
    },
    /// An event was appended to a user's own log.
    UserEvent {
        /// The user.
        user: UserId,
        /// Its seq in the user's log; 0 when nothing changed (a marker that did not move).
        seq: u64,
        /// The read marker after a mark-read.
        read_seq: u64,
    },
    /// A bot command was applied (`bot.rs`); `value` is what the command says it
    /// answers (the first update id of a hand-out, the confirmed offset, …).
    BotDone {
        /// The bot.
        bot: UserId,
        /// The command's answer.
        value: u64,
    },
    /// A finished upload was recorded (`Command::MediaStored`).
    MediaStored {
        /// The uploader.
        uploader: UserId,
        /// False when this uploader had stored the same content before.
        first_upload: bool,
    },
    /// Refused; nothing changed.
    Refused(Refusal),
    /// A secret-chat command was applied (`secret.rs` says what `n` means).
    Secret(SecretApplied),
    /// A chat-list acknowledgement was applied (`chat_lists.rs`): the records dropped.
    ChatLists {
        /// See the variant's docs.
        applied: u64,
    },
    /// A chat-list delivery was applied (`chat_lists.rs`): the users whose own log got
    /// an event (their list changed), in record order; empty for a repeat.
    ChatListsDelivered {
        /// The users.
        users: Vec<UserId>,
    },
    /// A retention command was applied (`chat::retention`).
    Retention {
        /// False when it changed nothing (the same policy, or a seed for a group that
        /// already has one).
        changed: bool,
    },
    /// A placement command was applied (group 0).
    Placement {
        /// The placement's version after it.
        version: u64,
        /// False when the command changed nothing (a repeat).
        changed: bool,
    },
}

impl Outcome {
    pub(crate) fn refused(code: RefusalCode, message: impl Into<String>) -> Outcome {
        Outcome::Refused(Refusal {
            code,
            message: message.into(),
        })
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.raw(s.as_bytes());
    }
    fn three(&mut self, tag: u8, a: u64, b: u64, c: u64) {
        self.u8(tag);
        self.u64(a);
        self.u64(b);
        self.u64(c);
    }
}

fn hash(r: &mut Reader<'_>) -> Result<[u8; 32], DecodeError> {
    let mut h = [0u8; 32];
    h.copy_from_slice(r.bytes(32)?);
    Ok(h)
}

/// The byte of a chat kind in commands and checkpoints.
pub(crate) fn kind_byte(k: ChatKind) -> u8 {
    match k {
        ChatKind::Direct => 1,
        ChatKind::Group => 2,
        ChatKind::Channel => 3,
    }
}

pub(crate) fn kind_from(r: &mut Reader<'_>) -> Result<ChatKind, DecodeError> {
    match r.u8()? {
        1 => Ok(ChatKind::Direct),
        2 => Ok(ChatKind::Group),
        3 => Ok(ChatKind::Channel),
        b => Err(DecodeError::new("chat kind", format!("unknown kind {b}"))),
    }
}

/// The byte of a role in commands and checkpoints.
pub(crate) fn role_byte(r: Role) -> u8 {
    match r {
        Role::Member => 1,
        Role::Admin => 2,
        Role::Owner => 3,
    }
}

pub(crate) fn role_from(r: &mut Reader<'_>) -> Result<Role, DecodeError> {
    match r.u8()? {
        1 => Ok(Role::Member),
        2 => Ok(Role::Admin),
        3 => Ok(Role::Owner),
        b => Err(DecodeError::new("role", format!("unknown role {b}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_span_of_posts_and_edits_is_exactly_their_text() {
        let text = "erase me ✓";
        for cmd in every_command() {
            let mut bytes = Vec::new();
            cmd.encode_into(&mut bytes);
            let span = message_text_span(&bytes);
            match &cmd {
                Command::Post { text: t, .. } | Command::Edit { text: t, .. } => {
                    let (at, len) = span.expect("a span");
                    assert_eq!(&bytes[at..at + len], t.as_bytes(), "{cmd:?}");
                }
                _ => assert_eq!(span, None, "{cmd:?}"),
            }
        }
        let post = Command::Post {
            chat: 1,
            sender: 2,
            client_message_id: 3,
            text: text.into(),
            media: None,
            reply_to: 4,
        };
        let mut bytes = Vec::new();
        post.encode_into(&mut bytes);
        let (at, len) = message_text_span(&bytes).unwrap();
        // Zeroed in place, the command still decodes, with a text of NULs of one length.
        bytes[at..at + len].fill(0);
        match Command::decode(&bytes).expect("decodes") {
            Command::Post { text: t, .. } => assert_eq!(t, "\0".repeat(text.len())),
            o => panic!("{o:?}"),
        }
        // Truncated bytes give no span.
        assert_eq!(message_text_span(&bytes[..at + len - 1]), None);
        assert_eq!(message_text_span(&bytes[..10]), None);
    }

    pub(crate) fn every_command() -> Vec<Command> {
        vec![
            Command::CreateUser {
                name: "alice".into(),
                login_token_hash: [7; 32],
            },
            Command::Login {
                user: 1 << 16,
                login_token_hash: [7; 32],
                device_id: "phone".into(),
                device_name: "Alice's phone".into(),
                session_token_hash: [9; 32],
            },
            Command::RevokeSession {
                user: 5,
                session_id: 2,
            },
            Command::CreateChat {
                creator: 1,
                kind: ChatKind::Group,
                title: "team".into(),
                members: vec![2, 3],
            },
            Command::Invite {
                chat: 1,
                actor: 2,
                user: 3,
            },
            Command::RemoveMember {
                chat: 1,
                actor: 2,
                user: 3,
            },
            Command::Leave { chat: 1, actor: 2 },
            Command::Ban {
                chat: 1,
                actor: 2,
                user: 3,
            },
            Command::Unban {
                chat: 1,
                actor: 2,
                user: 3,
            },
            Command::SetRole {
                chat: 1,
                actor: 2,
                user: 3,
                role: Role::Admin,
            },
            Command::Join { chat: 1, actor: 2 },
            Command::Post {
                chat: 1,
                sender: 2,
                client_message_id: 77,
                text: "héllo".into(),
                media: Some(MediaRef {
                    sha256: [1; 32],
                    size_bytes: 10,
                    mime_type: "image/png".into(),
                    file_name: "a.png".into(),
                }),
                reply_to: 3,
            },
            Command::Post {
                chat: 1,
                sender: 2,
                client_message_id: 78,
                text: String::new(),
                media: None,
                reply_to: 0,
            },
            Command::Edit {
                chat: 1,
                sender: 2,
                target: 3,
                text: "x".into(),
            },
            Command::Delete {
                chat: 1,
                sender: 2,
                target: 3,
            },
            Command::React {
                chat: 1,
                sender: 2,
                target: 3,
                reaction: "👍".into(),
                add: true,
            },
            Command::Pin {
                chat: 1,
                sender: 2,
                target: 3,
                pin: false,
            },
            Command::MarkRead {
                user: 1,
                chat: 2,
                seq: 3,
            },
            Command::UserChatAdded { user: 1, chat: 2 },
            Command::UserChatRemoved { user: 1, chat: 2 },
            Command::ChatListDelivery {
                source: 7,
                records: vec![
                    crate::chat::chat_lists::ChatListRecord {
                        no: 3,
                        user: 1,
                        chat: 2,
                        added: true,
                    },
                    crate::chat::chat_lists::ChatListRecord {
                        no: 4,
                        user: 5,
                        chat: 2,
                        added: false,
                    },
                ],
            },
            Command::ChatListAcked { upto: 4 },
            Command::Bot(crate::chat::bot::BotCommand::Create {
                owner: 1,
                name: "echo_bot".into(),
                token_hash: [3; 32],
            }),
            Command::Bot(crate::chat::bot::BotCommand::HandOut {
                bot: 1,
                ranges: vec![crate::chat::bot::HandOutRange {
                    chat: 2,
                    from_seq: 1,
                    to_seq: 4,
                }],
            }),
            Command::Bot(crate::chat::bot::BotCommand::Confirm { bot: 1, offset: 3 }),
            Command::Placement(crate::chat::placement::PlacementCommand::MoveStart {
                group: 3,
                from: 1,
                to: 4,
            }),
            Command::MediaStored {
                uploader: 1,
                media: MediaRef {
                    sha256: [3; 32],
                    size_bytes: 1 << 33,
                    mime_type: "video/mp4".into(),
                    file_name: "clip.mp4".into(),
                },
            },
        ]
        .into_iter()
        .chain(
            crate::chat::secret::tests::every_secret_command()
                .into_iter()
                .map(Command::Secret),
        )
        .collect()
    }

    #[test]
    fn batches_round_trip_and_reach_each_command() {
        let batch = Batch {
            timestamp_ms: 1_700_000_000_000,
            commands: every_command(),
        };
        let bytes = batch.encode();
        let decoded = DecodedBatch::parse(bytes.clone()).expect("parses");
        assert_eq!(decoded.timestamp_ms, batch.timestamp_ms);
        assert_eq!(decoded.len(), batch.commands.len());
        for (i, c) in batch.commands.iter().enumerate() {
            assert_eq!(&decoded.command(i).expect("decodes"), c, "command {i}");
        }
        assert!(decoded.command(batch.commands.len()).is_err());
    }

    #[test]
    fn truncated_or_garbled_batches_are_refused() {
        let bytes = Batch {
            timestamp_ms: 1,
            commands: every_command(),
        }
        .encode();
        for len in 0..bytes.len() {
            assert!(
                DecodedBatch::parse(bytes.slice(..len)).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        let mut wrong_version = bytes.to_vec();
        wrong_version[0] = 9;
        assert!(DecodedBatch::parse(Bytes::from(wrong_version)).is_err());
        // Each command's own bytes, cut short, fail to decode rather than panic.
        for c in every_command() {
            let mut out = Vec::new();
            c.encode_into(&mut out);
            for len in 0..out.len() {
                assert!(Command::decode(&out[..len]).is_err(), "{c:?} cut at {len}");
            }
            out.push(0);
            assert!(Command::decode(&out).is_err(), "{c:?} with a trailing byte");
        }
        assert!(Command::decode(&[200]).is_err());
    }
}
