//! Secret chats as the replicated state sees them: opaque ciphertext relayed between two
//! devices, kept only until the target device acknowledges it or its time-to-live ends.
//!
//! What it owns: the secret-chat commands (tags 50-59 of the chat command encoding) and
//! their bytes, the published device keys and each device's list of secret chats (in the
//! user's group), the secret chats themselves and their pending messages (in the chat's
//! group: two device identities, the initiator's one-time public key, per direction the
//! last counter accepted), and the list of recent erasures that every replica's eraser
//! (`raft/src/secret_erase.rs`) turns into zeroed bytes on disk. What it must not do:
//! hold ciphertext. A pending message is a location `(raft index, position)` in the Raft
//! log, like a chat event; the bytes live only in that one log entry, never in a
//! checkpoint or a snapshot. Nor may it read clocks: expiry compares a message's deadline
//! (its batch timestamp plus its TTL) with the timestamp of a later batch, so every
//! replica erases the same messages at the same log position.
//!
//! The server never sees a plaintext or a key. What it sees of a message: the secret chat,
//! the sending device, the counter and key epoch (both also bound into the AEAD by the
//! clients), the TTL, the self-destruct timer, and the ciphertext bytes.
//!
//! Command bytes (little-endian; strings are a u32 length then UTF-8):
//!
//! ```text
//! 50 publish_key  user u64 | device str | public_key [32]
//! 51 start        initiator u64 | initiator_device str | initiator_key [32]
//!                 | ephemeral_key [32] | responder u64 | responder_device str
//!                 | responder_key [32]
//! 52 device_chat  user u64 | device str | chat u64
//! 53 send         chat u64 | sender u64 | sender_device str | counter u64 | epoch u32
//!                 | ttl_ms u64 | self_destruct_s u32 | ciphertext_len u32 | ciphertext
//!                 (the ciphertext is the command's last bytes, so the eraser finds it
//!                 from the command's end without knowing the other fields)
//! 54 ack          chat u64 | user u64 | device str | counter u64
//! 55 tick         (no fields)
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::chat::command::{Outcome, RefusalCode};
use crate::chat::{ChatId, UserId, make_id};
use crate::codec::{DecodeError, Reader};
use crate::types::GroupId;

/// Bytes of an X25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Longest device id (the gateway enforces the protocol's limit, which is smaller).
pub const SECRET_DEVICE_BYTES_MAX: usize = 256;
/// Largest ciphertext one secret message may carry. Why: a message text is at most
/// 16 KiB in the protocol (`TEXT_BYTES_MAX`); this leaves room for the sealed header and
/// the AEAD tag, and keeps one pending message far below an entry's size limit.
pub const SECRET_CIPHERTEXT_BYTES_MAX: usize = 20 * 1024;
/// Longest time-to-live a sender may ask for. Why: the server keeps a message for a
/// device that is offline at most this long (a week covers a device left at home over a
/// holiday); after it the ciphertext is erased unread.
pub const SECRET_TTL_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// Shortest time-to-live. Why: below a second, a message would expire before a device
/// that is online has read it.
pub const SECRET_TTL_MS_MIN: u64 = 1000;
/// Messages waiting for one device in one secret chat. Why: bounds what a sender can make
/// the server keep for a device that never reads; at 20 KiB each, 80 MiB at most.
pub const SECRET_PENDING_PER_DIRECTION_MAX: u64 = 4096;
/// Secret chats one device may be part of. Why: bounds the device's list, which
/// `secret_list` returns in one response.
pub const SECRET_CHATS_PER_DEVICE_MAX: usize = 1024;
/// Devices with a published key per user. Why: the same bound as sessions per user.
pub const SECRET_DEVICES_PER_USER_MAX: usize = 64;
/// Erasures remembered for the erasers, by count. Why: an eraser that restarted redoes
/// the ones it may have missed (crash between apply and the zeroing write); 16,384 × 32
/// bytes = 512 KiB of checkpoint at most.
pub const SECRET_ERASURES_KEPT_MAX: usize = 16 * 1024;
/// Erasures remembered for the erasers, by age (batch timestamps). Why: an eraser is at
/// most a restart behind; an hour is far more than a restart takes.
pub const SECRET_ERASURES_KEPT_MS: u64 = 3600 * 1000;

pub(crate) mod tag {
    pub const PUBLISH_KEY: u8 = 50;
    pub const START: u8 = 51;
    pub const DEVICE_CHAT: u8 = 52;
    pub const SEND: u8 = 53;
    pub const ACK: u8 = 54;
    pub const TICK: u8 = 55;
    /// First and last tag of the range owned by secret chats.
    pub const FIRST: u8 = 50;
    pub const LAST: u8 = 59;
}

/// An X25519 public key.
pub type PublicKey = [u8; PUBLIC_KEY_BYTES];

/// One secret-chat command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretCommand {
    /// Publishes (or replaces) a device's identity key (in the user's group).
    PublishKey {
        /// The device's user.
        user: UserId,
        /// The device id of the session that publishes.
        device: String,
        /// The X25519 public key.
        public_key: PublicKey,
    },
    /// Opens a secret chat between two devices (in the chat's group).
    Start {
        /// Who starts it.
        initiator: UserId,
        /// From which device.
        initiator_device: String,
        /// That device's published identity key.
        initiator_key: PublicKey,
        /// The initiator's one-time key for this chat.
        ephemeral_key: PublicKey,
        /// The other user.
        responder: UserId,
        /// The other device.
        responder_device: String,
        /// Its published identity key (as read by the gateway when the chat started).
        responder_key: PublicKey,
    },
    /// Adds a secret chat to a device's list (in the user's group).
    DeviceChat {
        /// The device's user.
        user: UserId,
        /// The device.
        device: String,
        /// The secret chat.
        chat: ChatId,
    },
    /// Relays one sealed message to the chat's other device.
    Send {
        /// The secret chat.
        chat: ChatId,
        /// The sending user.
        sender: UserId,
        /// The sending device.
        sender_device: String,
        /// The sender's counter in this direction (greater than any before).
        counter: u64,
        /// The key epoch the message was sealed with.
        epoch: u32,
        /// How long the server keeps it for an absent device.
        ttl_ms: u64,
        /// The sender's self-destruct timer (seconds after reading; 0 for none).
        self_destruct_s: u32,
        /// The sealed bytes; last in the encoding.
        ciphertext: Vec<u8>,
    },
    /// The target device acknowledges every message to it up to `counter`: erased.
    Ack {
        /// The secret chat.
        chat: ChatId,
        /// The acknowledging user.
        user: UserId,
        /// The acknowledging device.
        device: String,
        /// The highest counter acknowledged.
        counter: u64,
    },
    /// Expires what is due by the batch timestamp (the group leader proposes it when a
    /// deadline passed and nothing else was written).
    Tick,
}

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
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
}

fn key(r: &mut Reader<'_>) -> Result<PublicKey, DecodeError> {
    let mut k = [0u8; PUBLIC_KEY_BYTES];
    k.copy_from_slice(r.bytes(PUBLIC_KEY_BYTES)?);
    Ok(k)
}

impl SecretCommand {
    /// True when `tag` is in the range of secret-chat commands.
    pub fn owns_tag(tag: u8) -> bool {
        (tag::FIRST..=tag::LAST).contains(&tag)
    }

    /// Appends the command's bytes (tag and fields).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        match self {
            SecretCommand::PublishKey {
                user,
                device,
                public_key,
            } => {
                w.u8(tag::PUBLISH_KEY);
                w.u64(*user);
                w.str(device);
                w.raw(public_key);
            }
            SecretCommand::Start {
                initiator,
                initiator_device,
                initiator_key,
                ephemeral_key,
                responder,
                responder_device,
                responder_key,
            } => {
                w.u8(tag::START);
                w.u64(*initiator);
                w.str(initiator_device);
                w.raw(initiator_key);
                w.raw(ephemeral_key);
                w.u64(*responder);
                w.str(responder_device);
                w.raw(responder_key);
            }
            SecretCommand::DeviceChat { user, device, chat } => {
                w.u8(tag::DEVICE_CHAT);
                w.u64(*user);
                w.str(device);
                w.u64(*chat);
            }
            SecretCommand::Send {
                chat,
                sender,
                sender_device,
                counter,
                epoch,
                ttl_ms,
                self_destruct_s,
                ciphertext,
            } => {
                w.u8(tag::SEND);
                w.u64(*chat);
                w.u64(*sender);
                w.str(sender_device);
                w.u64(*counter);
                w.u32(*epoch);
                w.u64(*ttl_ms);
                w.u32(*self_destruct_s);
                w.u32(ciphertext.len() as u32);
                w.raw(ciphertext);
            }
            SecretCommand::Ack {
                chat,
                user,
                device,
                counter,
            } => {
                w.u8(tag::ACK);
                w.u64(*chat);
                w.u64(*user);
                w.str(device);
                w.u64(*counter);
            }
            SecretCommand::Tick => w.u8(tag::TICK),
        }
    }

    /// Decodes the fields after tag `tag` (already read from `r`); the caller checks
    /// that nothing follows.
    pub(crate) fn decode_fields(tag: u8, r: &mut Reader<'_>) -> Result<SecretCommand, DecodeError> {
        let s = SECRET_DEVICE_BYTES_MAX;
        Ok(match tag {
            tag::PUBLISH_KEY => SecretCommand::PublishKey {
                user: r.u64()?,
                device: r.string(s)?,
                public_key: key(r)?,
            },
            tag::START => SecretCommand::Start {
                initiator: r.u64()?,
                initiator_device: r.string(s)?,
                initiator_key: key(r)?,
                ephemeral_key: key(r)?,
                responder: r.u64()?,
                responder_device: r.string(s)?,
                responder_key: key(r)?,
            },
            tag::DEVICE_CHAT => SecretCommand::DeviceChat {
                user: r.u64()?,
                device: r.string(s)?,
                chat: r.u64()?,
            },
            tag::SEND => SecretCommand::Send {
                chat: r.u64()?,
                sender: r.u64()?,
                sender_device: r.string(s)?,
                counter: r.u64()?,
                epoch: r.u32()?,
                ttl_ms: r.u64()?,
                self_destruct_s: r.u32()?,
                ciphertext: r.len_prefixed(SECRET_CIPHERTEXT_BYTES_MAX)?.to_vec(),
            },
            tag::ACK => SecretCommand::Ack {
                chat: r.u64()?,
                user: r.u64()?,
                device: r.string(s)?,
                counter: r.u64()?,
            },
            tag::TICK => SecretCommand::Tick,
            other => {
                return Err(DecodeError::new(
                    "secret command",
                    format!("unknown secret command tag {other}"),
                ));
            }
        })
    }
}

/// Where the ciphertext of a `send` command lies in the command's bytes (tag included):
/// `(offset, length)`. `None` if the bytes are not a well-formed `send`.
pub fn send_ciphertext_span(command: &[u8]) -> Option<(usize, usize)> {
    let mut r = Reader::new("secret command", command);
    if r.u8().ok()? != tag::SEND {
        return None;
    }
    let SecretCommand::Send { ciphertext, .. } =
        SecretCommand::decode_fields(tag::SEND, &mut r).ok()?
    else {
        return None;
    };
    r.finish().ok()?;
    // The ciphertext is the last field.
    Some((command.len() - ciphertext.len(), ciphertext.len()))
}

/// What applying a secret command answered (inside [`Outcome::Secret`]): the chat (or
/// 0) and a number whose meaning depends on the command: the pending message's number
/// for `send`, the number of messages erased for `ack` and `tick`, 0 otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretApplied {
    /// The secret chat concerned, 0 for none.
    pub chat: ChatId,
    /// See the type's docs.
    pub n: u64,
}

/// One end of a secret chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: String,
    /// Its identity key when the chat started.
    pub key: PublicKey,
}

/// A secret chat as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretChatView {
    /// The chat.
    pub chat: ChatId,
    /// When it started (batch timestamp).
    pub created_ms: u64,
    /// Who started it.
    pub initiator: Party,
    /// The other end.
    pub responder: Party,
    /// The initiator's one-time key for this chat.
    pub ephemeral_key: PublicKey,
}

impl SecretChatView {
    /// 0 when `(user, device)` is the initiator, 1 the responder, `None` if neither.
    pub fn side_of(&self, user: UserId, device: &str) -> Option<usize> {
        if self.initiator.user == user && self.initiator.device == device {
            Some(0)
        } else if self.responder.user == user && self.responder.device == device {
            Some(1)
        } else {
            None
        }
    }

    /// The party on side `side` (0 initiator, 1 responder).
    pub fn party(&self, side: usize) -> &Party {
        if side == 0 {
            &self.initiator
        } else {
            &self.responder
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SecretChat {
    view: SecretChatView,
    /// Per sending side (0 initiator, 1 responder): the last counter accepted.
    last_counter: [u64; 2],
    /// Per sending side: messages pending for the other side.
    pending: [u64; 2],
}

/// A message waiting for its target device, as readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingView {
    /// The group's number for it (increasing in apply order).
    pub no: u64,
    /// The secret chat.
    pub chat: ChatId,
    /// The sending side (0 initiator, 1 responder); the target is the other one.
    pub from_side: u8,
    /// The sender's counter.
    pub counter: u64,
    /// The key epoch.
    pub epoch: u32,
    /// When it was sent (batch timestamp).
    pub sent_ms: u64,
    /// When the server erases it unread.
    pub deadline_ms: u64,
    /// The sender's self-destruct timer in seconds.
    pub self_destruct_s: u32,
    /// The Raft entry holding the ciphertext.
    pub raft_index: u64,
    /// The command's position in that entry.
    pub pos: u32,
}

/// One erasure for the erasers: the location of a command whose message bytes must be
/// zeroed on disk (a secret `send`'s ciphertext, a deleted post's or edit's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erasure {
    /// Its number (1, 2, …; `erasures_total` is the last).
    pub no: u64,
    /// The batch timestamp that erased it.
    pub erased_ms: u64,
    /// The Raft entry holding the ciphertext.
    pub raft_index: u64,
    /// The command's position in that entry.
    pub pos: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Device {
    key: PublicKey,
    chats: BTreeSet<ChatId>,
}

/// The secret-chat part of a group's state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecretState {
    next_chat: u64,
    next_message: u64,
    /// Published keys and secret chat lists of this group's users' devices.
    devices: BTreeMap<(UserId, String), Device>,
    chats: BTreeMap<ChatId, SecretChat>,
    /// Derived: one-time key → chat, so a repeated start finds its chat.
    by_ephemeral: BTreeMap<PublicKey, ChatId>,
    pending: BTreeMap<u64, PendingView>,
    /// Derived: `(chat, from_side, counter) → no`, for acks.
    by_chat: BTreeMap<(ChatId, u8, u64), u64>,
    /// Derived: `(deadline, no)`, for expiry.
    by_deadline: BTreeSet<(u64, u64)>,
    erasures: VecDeque<Erasure>,
    erasures_total: u64,
}

fn refuse(code: RefusalCode, msg: impl Into<String>) -> Outcome {
    Outcome::refused(code, msg)
}

fn applied(chat: ChatId, n: u64) -> Outcome {
    Outcome::Secret(SecretApplied { chat, n })
}

impl SecretState {
    /// Applies one secret command stamped `ts` that sits at `(raft_index, pos)`.
    /// `user_exists` says whether a user lives in this group.
    pub fn apply(
        &mut self,
        group: GroupId,
        cmd: &SecretCommand,
        ts: u64,
        raft_index: u64,
        pos: usize,
        user_exists: impl Fn(UserId) -> bool,
    ) -> Outcome {
        // Expiry first: a command never sees a message past its deadline.
        let expired = self.expire(ts);
        match cmd {
            SecretCommand::Tick => applied(0, expired),
            SecretCommand::PublishKey {
                user,
                device,
                public_key,
            } => {
                if !user_exists(*user) {
                    return refuse(RefusalCode::NotFound, format!("no user {user}"));
                }
                if device.is_empty() {
                    return refuse(RefusalCode::BadRequest, "the device id is empty");
                }
                let known = self.devices.contains_key(&(*user, device.clone()));
                if !known
                    && self
                        .devices
                        .range((*user, String::new())..)
                        .take_while(|((u, _), _)| u == user)
                        .count()
                        >= SECRET_DEVICES_PER_USER_MAX
                {
                    return refuse(
                        RefusalCode::Conflict,
                        format!("user {user} has {SECRET_DEVICES_PER_USER_MAX} devices with keys"),
                    );
                }
                self.devices.entry((*user, device.clone())).or_default().key = *public_key;
                applied(0, 0)
            }
            SecretCommand::DeviceChat { user, device, chat } => {
                let Some(d) = self.devices.get_mut(&(*user, device.clone())) else {
                    return refuse(
                        RefusalCode::NotFound,
                        format!("device {device:?} of user {user} published no key"),
                    );
                };
                if !d.chats.contains(chat) && d.chats.len() >= SECRET_CHATS_PER_DEVICE_MAX {
                    return refuse(
                        RefusalCode::Conflict,
                        format!("the device is in {SECRET_CHATS_PER_DEVICE_MAX} secret chats"),
                    );
                }
                d.chats.insert(*chat);
                applied(*chat, 0)
            }
            SecretCommand::Start {
                initiator,
                initiator_device,
                initiator_key,
                ephemeral_key,
                responder,
                responder_device,
                responder_key,
            } => {
                if initiator_device.is_empty() || responder_device.is_empty() {
                    return refuse(RefusalCode::BadRequest, "a device id is empty");
                }
                if initiator == responder && initiator_device == responder_device {
                    return refuse(
                        RefusalCode::BadRequest,
                        "a secret chat needs two different devices",
                    );
                }
                // A repeated start (same one-time key) returns the chat it made.
                if let Some(id) = self.by_ephemeral.get(ephemeral_key) {
                    return applied(*id, 0);
                }
                let id = make_id(group, self.next_chat.max(1));
                self.next_chat = self.next_chat.max(1) + 1;
                self.by_ephemeral.insert(*ephemeral_key, id);
                self.chats.insert(
                    id,
                    SecretChat {
                        view: SecretChatView {
                            chat: id,
                            created_ms: ts,
                            initiator: Party {
                                user: *initiator,
                                device: initiator_device.clone(),
                                key: *initiator_key,
                            },
                            responder: Party {
                                user: *responder,
                                device: responder_device.clone(),
                                key: *responder_key,
                            },
                            ephemeral_key: *ephemeral_key,
                        },
                        last_counter: [0, 0],
                        pending: [0, 0],
                    },
                );
                applied(id, 0)
            }
            SecretCommand::Send {
                chat,
                sender,
                sender_device,
                counter,
                epoch,
                ttl_ms,
                self_destruct_s,
                ciphertext,
            } => {
                let Some(c) = self.chats.get_mut(chat) else {
                    return refuse(RefusalCode::NotFound, format!("no secret chat {chat}"));
                };
                let Some(side) = c.view.side_of(*sender, sender_device) else {
                    return refuse(
                        RefusalCode::PermissionDenied,
                        "only the chat's two devices send in a secret chat",
                    );
                };
                if !(SECRET_TTL_MS_MIN..=SECRET_TTL_MS_MAX).contains(ttl_ms) {
                    return refuse(
                        RefusalCode::BadRequest,
                        format!(
                            "ttl {ttl_ms} ms is not {SECRET_TTL_MS_MIN} to {SECRET_TTL_MS_MAX}"
                        ),
                    );
                }
                if ciphertext.is_empty() {
                    return refuse(RefusalCode::BadRequest, "the ciphertext is empty");
                }
                if *counter <= c.last_counter[side] {
                    return refuse(
                        RefusalCode::Conflict,
                        format!(
                            "counter {counter} is not above the last one, {}",
                            c.last_counter[side]
                        ),
                    );
                }
                if c.pending[side] >= SECRET_PENDING_PER_DIRECTION_MAX {
                    return refuse(
                        RefusalCode::Conflict,
                        format!(
                            "{SECRET_PENDING_PER_DIRECTION_MAX} messages already wait for the other device"
                        ),
                    );
                }
                c.last_counter[side] = *counter;
                c.pending[side] += 1;
                self.next_message += 1;
                let no = self.next_message;
                let deadline_ms = ts.saturating_add(*ttl_ms);
                let p = PendingView {
                    no,
                    chat: *chat,
                    from_side: side as u8,
                    counter: *counter,
                    epoch: *epoch,
                    sent_ms: ts,
                    deadline_ms,
                    self_destruct_s: *self_destruct_s,
                    raft_index,
                    pos: pos as u32,
                };
                self.insert_pending(p);
                applied(*chat, no)
            }
            SecretCommand::Ack {
                chat,
                user,
                device,
                counter,
            } => {
                let Some(c) = self.chats.get(chat) else {
                    return refuse(RefusalCode::NotFound, format!("no secret chat {chat}"));
                };
                let Some(side) = c.view.side_of(*user, device) else {
                    return refuse(
                        RefusalCode::PermissionDenied,
                        "only the chat's target device acknowledges its messages",
                    );
                };
                // Messages to `side` were sent by the other side.
                let from = (1 - side) as u8;
                let nos: Vec<u64> = self
                    .by_chat
                    .range((*chat, from, 0)..=(*chat, from, *counter))
                    .map(|(_, no)| *no)
                    .collect();
                for no in &nos {
                    self.erase(*no, ts);
                }
                applied(*chat, nos.len() as u64)
            }
        }
    }

    fn insert_pending(&mut self, p: PendingView) {
        self.by_chat.insert((p.chat, p.from_side, p.counter), p.no);
        self.by_deadline.insert((p.deadline_ms, p.no));
        self.pending.insert(p.no, p);
    }

    /// Removes pending message `no` and records its erasure.
    fn erase(&mut self, no: u64, ts: u64) {
        let Some(p) = self.pending.remove(&no) else {
            return;
        };
        self.by_chat.remove(&(p.chat, p.from_side, p.counter));
        self.by_deadline.remove(&(p.deadline_ms, p.no));
        if let Some(c) = self.chats.get_mut(&p.chat) {
            c.pending[p.from_side as usize] -= 1;
        }
        self.record_erasure(p.raft_index, p.pos, ts);
    }

    /// Records that the message bytes of the command at `(raft_index, pos)` must leave
    /// the disk: a secret `send`'s ciphertext, or the text of a deleted post or of an
    /// edit of it (`GroupState` calls this on a delete). Every replica's eraser zeroes
    /// them (`secret_log`).
    pub fn record_erasure(&mut self, raft_index: u64, pos: u32, ts: u64) {
        self.erasures_total += 1;
        self.erasures.push_back(Erasure {
            no: self.erasures_total,
            erased_ms: ts,
            raft_index,
            pos,
        });
        while self.erasures.len() > SECRET_ERASURES_KEPT_MAX
            || self
                .erasures
                .front()
                .is_some_and(|e| e.erased_ms.saturating_add(SECRET_ERASURES_KEPT_MS) < ts)
        {
            self.erasures.pop_front();
        }
    }

    /// Erases every pending message whose deadline is at or before `ts`.
    fn expire(&mut self, ts: u64) -> u64 {
        let due: Vec<u64> = self
            .by_deadline
            .range(..=(ts, u64::MAX))
            .map(|(_, no)| *no)
            .collect();
        for no in &due {
            self.erase(*no, ts);
        }
        due.len() as u64
    }

    // ---- reads -----------------------------------------------------------------------

    /// A device's published key.
    pub fn device_key(&self, user: UserId, device: &str) -> Option<PublicKey> {
        self.devices.get(&(user, device.to_string())).map(|d| d.key)
    }

    /// The secret chats in a device's list.
    pub fn device_chats(&self, user: UserId, device: &str) -> Vec<ChatId> {
        self.devices
            .get(&(user, device.to_string()))
            .map_or_else(Vec::new, |d| d.chats.iter().copied().collect())
    }

    /// A secret chat.
    pub fn chat(&self, chat: ChatId) -> Option<SecretChatView> {
        self.chats.get(&chat).map(|c| c.view.clone())
    }

    /// Messages pending for side `to_side` of `chat`, oldest counter first.
    pub fn pending_to(&self, chat: ChatId, to_side: usize) -> Vec<PendingView> {
        let from = (1 - to_side) as u8;
        self.by_chat
            .range((chat, from, 0)..=(chat, from, u64::MAX))
            .filter_map(|(_, no)| self.pending.get(no).copied())
            .collect()
    }

    /// Pending messages numbered after `after`, in number order, at most `limit`.
    pub fn pending_after(&self, after: u64, limit: usize) -> Vec<PendingView> {
        self.pending
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, p)| *p)
            .collect()
    }

    /// Pending messages held in the Raft entries after `after_index` through
    /// `through_index`, in number order: what a cross-node fan-out answer for those
    /// entries delivers. Numbers follow apply order, so Raft indexes never decrease along
    /// them: the walk goes back from the newest and stops at the first message at or
    /// below `after_index`, touching only messages newer than that (not every pending
    /// one).
    pub fn pending_in_entries(&self, after_index: u64, through_index: u64) -> Vec<PendingView> {
        let mut found: Vec<PendingView> = self
            .pending
            .values()
            .rev()
            .take_while(|p| p.raft_index > after_index)
            .filter(|p| p.raft_index <= through_index)
            .copied()
            .collect();
        found.reverse();
        found
    }

    /// The number of the last message accepted (0 before any).
    pub fn last_message_no(&self) -> u64 {
        self.next_message
    }

    /// The lowest Raft index holding a pending message (retention must keep it: the
    /// message would be lost unread), `None` when none is pending.
    pub fn earliest_pending_raft_index(&self) -> Option<u64> {
        self.pending.values().map(|p| p.raft_index).min()
    }

    /// Messages pending in the group.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The earliest deadline of a pending message.
    pub fn earliest_deadline_ms(&self) -> Option<u64> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// Erasures numbered after `after` that are still remembered, and the number of the
    /// last one ever made.
    pub fn erasures_after(&self, after: u64) -> (Vec<Erasure>, u64) {
        (
            self.erasures
                .iter()
                .filter(|e| e.no > after)
                .copied()
                .collect(),
            self.erasures_total,
        )
    }

    /// The number of the last erasure made (0 before any).
    pub fn erasures_total(&self) -> u64 {
        self.erasures_total
    }

    // ---- checkpoint ------------------------------------------------------------------

    /// Appends the state's checkpoint bytes (deterministic: maps in key order).
    ///
    /// ```text
    /// next_chat u64 | next_message u64 | erasures_total u64
    /// device_count u64 × ( user u64 | device str | key [32] | chat_count u64 × chat u64 )
    /// chat_count u64 × ( chat u64 | created_ms u64 | 2 × (user u64 | device str | key [32])
    ///                    | ephemeral [32] | last_counter 2 × u64 | pending 2 × u64 )
    /// pending_count u64 × ( no u64 | chat u64 | from_side u8 | counter u64 | epoch u32
    ///                       | sent_ms u64 | deadline_ms u64 | self_destruct_s u32
    ///                       | raft_index u64 | pos u32 )
    /// erasure_count u64 × ( no u64 | erased_ms u64 | raft_index u64 | pos u32 )
    /// ```
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        w.u64(self.next_chat);
        w.u64(self.next_message);
        w.u64(self.erasures_total);
        w.u64(self.devices.len() as u64);
        for ((user, device), d) in &self.devices {
            w.u64(*user);
            w.str(device);
            w.raw(&d.key);
            w.u64(d.chats.len() as u64);
            for c in &d.chats {
                w.u64(*c);
            }
        }
        w.u64(self.chats.len() as u64);
        for (id, c) in &self.chats {
            w.u64(*id);
            w.u64(c.view.created_ms);
            for p in [&c.view.initiator, &c.view.responder] {
                w.u64(p.user);
                w.str(&p.device);
                w.raw(&p.key);
            }
            w.raw(&c.view.ephemeral_key);
            for v in c.last_counter.iter().chain(c.pending.iter()) {
                w.u64(*v);
            }
        }
        w.u64(self.pending.len() as u64);
        for p in self.pending.values() {
            w.u64(p.no);
            w.u64(p.chat);
            w.u8(p.from_side);
            w.u64(p.counter);
            w.u32(p.epoch);
            w.u64(p.sent_ms);
            w.u64(p.deadline_ms);
            w.u32(p.self_destruct_s);
            w.u64(p.raft_index);
            w.u32(p.pos);
        }
        w.u64(self.erasures.len() as u64);
        for e in &self.erasures {
            w.u64(e.no);
            w.u64(e.erased_ms);
            w.u64(e.raft_index);
            w.u32(e.pos);
        }
    }

    /// Decodes what [`SecretState::encode_into`] wrote.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<SecretState, DecodeError> {
        let count = |r: &mut Reader<'_>, item: usize| -> Result<usize, DecodeError> {
            let n = r.u64()? as usize;
            if n.saturating_mul(item) > r.remaining() {
                return Err(DecodeError::new(
                    "secret state",
                    format!("count {n} exceeds the bytes left"),
                ));
            }
            Ok(n)
        };
        let s = SECRET_DEVICE_BYTES_MAX;
        let mut st = SecretState {
            next_chat: r.u64()?,
            next_message: r.u64()?,
            erasures_total: r.u64()?,
            ..SecretState::default()
        };
        for _ in 0..count(r, 8 + 4 + 32 + 8)? {
            let user = r.u64()?;
            let device = r.string(s)?;
            let key = key(r)?;
            let mut chats = BTreeSet::new();
            for _ in 0..count(r, 8)? {
                chats.insert(r.u64()?);
            }
            st.devices.insert((user, device), Device { key, chats });
        }
        for _ in 0..count(r, 8 * 2)? {
            let id = r.u64()?;
            let created_ms = r.u64()?;
            let mut party = || -> Result<Party, DecodeError> {
                Ok(Party {
                    user: r.u64()?,
                    device: r.string(s)?,
                    key: key(r)?,
                })
            };
            let initiator = party()?;
            let responder = party()?;
            let ephemeral_key = key(r)?;
            let last_counter = [r.u64()?, r.u64()?];
            let pending = [r.u64()?, r.u64()?];
            st.by_ephemeral.insert(ephemeral_key, id);
            st.chats.insert(
                id,
                SecretChat {
                    view: SecretChatView {
                        chat: id,
                        created_ms,
                        initiator,
                        responder,
                        ephemeral_key,
                    },
                    last_counter,
                    pending,
                },
            );
        }
        for _ in 0..count(r, 69)? {
            let p = PendingView {
                no: r.u64()?,
                chat: r.u64()?,
                from_side: r.u8()?,
                counter: r.u64()?,
                epoch: r.u32()?,
                sent_ms: r.u64()?,
                deadline_ms: r.u64()?,
                self_destruct_s: r.u32()?,
                raft_index: r.u64()?,
                pos: r.u32()?,
            };
            if p.from_side > 1 {
                return Err(DecodeError::new(
                    "secret state",
                    format!("pending message {} has side {}", p.no, p.from_side),
                ));
            }
            st.insert_pending(p);
        }
        for _ in 0..count(r, 28)? {
            st.erasures.push_back(Erasure {
                no: r.u64()?,
                erased_ms: r.u64()?,
                raft_index: r.u64()?,
                pos: r.u32()?,
            });
        }
        Ok(st)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn every_secret_command() -> Vec<SecretCommand> {
        vec![
            SecretCommand::PublishKey {
                user: 1 << 16 | 1,
                device: "phone".into(),
                public_key: [3; 32],
            },
            SecretCommand::Start {
                initiator: 1 << 16 | 1,
                initiator_device: "phone".into(),
                initiator_key: [3; 32],
                ephemeral_key: [4; 32],
                responder: 2 << 16 | 1,
                responder_device: "laptop".into(),
                responder_key: [5; 32],
            },
            SecretCommand::DeviceChat {
                user: 1 << 16 | 1,
                device: "phone".into(),
                chat: 1 << 16 | 1,
            },
            SecretCommand::Send {
                chat: 1 << 16 | 1,
                sender: 1 << 16 | 1,
                sender_device: "phone".into(),
                counter: 1,
                epoch: 0,
                ttl_ms: 60_000,
                self_destruct_s: 5,
                ciphertext: vec![0xab; 40],
            },
            SecretCommand::Ack {
                chat: 1 << 16 | 1,
                user: 2 << 16 | 1,
                device: "laptop".into(),
                counter: 1,
            },
            SecretCommand::Tick,
        ]
    }

    #[test]
    fn the_ciphertext_span_names_the_last_bytes_of_a_send() {
        for c in every_secret_command() {
            let mut out = Vec::new();
            c.encode_into(&mut out);
            match &c {
                SecretCommand::Send { ciphertext, .. } => {
                    let (at, len) = send_ciphertext_span(&out).expect("a send");
                    assert_eq!(&out[at..at + len], &ciphertext[..]);
                    assert_eq!(at + len, out.len());
                    // Zeroed in place, the command still decodes, with a zero ciphertext.
                    out[at..].fill(0);
                    let mut r = Reader::new("t", &out[1..]);
                    match SecretCommand::decode_fields(tag::SEND, &mut r).unwrap() {
                        SecretCommand::Send { ciphertext: z, .. } => {
                            assert_eq!(z, vec![0; ciphertext.len()]);
                        }
                        other => panic!("{other:?}"),
                    }
                }
                _ => assert_eq!(send_ciphertext_span(&out), None),
            }
        }
    }
}
