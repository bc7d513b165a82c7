//! Bot accounts and their durable update cursors (issue 11: the HTTP bot API).
//!
//! What it owns: the bot commands (tags 60-69 of the chat command vocabulary), the per-bot
//! state kept in the bot user's group (owner, webhook, the update ids handed out and not
//! yet confirmed), the rules that change it and its checkpoint bytes. What it must not
//! do: read clocks, draw random numbers or do I/O (like everything in `chat/`), or read
//! chat logs: the gateway reads events from the chats' own logs and only asks this state
//! which ids name which `(chat, seq)`.
//!
//! Why durable update ids. A bot confirms updates by asking for `offset = last id + 1`.
//! If ids were assigned in memory, a restart could give id `X` to another event and the
//! bot's next `offset = X + 1` would confirm an event it never saw. So handing out
//! updates first commits their assignment ([`BotCommand::HandOut`]): id range → `(chat,
//! seq range)`. A restart re-delivers the same `(update_id, event)` pairs; an id never
//! names a different event, and a `(chat, seq)` never gets a second id (a hand-out must
//! start after the chat's cursor).
//!
//! Checkpoint bytes (appended at the end of `GroupState`'s encoding), little-endian:
//!
//! ```text
//! count u64, then per bot in id order:
//!   bot u64 | owner u64 | next_update_id u64 | confirmed u64
//!   webhook u8 (0 none, 1 set) [ url str | secret_token str ]
//!   cursors count u64 × ( chat u64 | last handed-out seq u64 )
//!   pending count u64 × ( first_update_id u64 | chat u64 | from_seq u64 | to_seq u64 )
//! ```
//! Strings are a u32 length then UTF-8.

use std::collections::{BTreeMap, VecDeque};

use crate::chat::command::{Outcome, RefusalCode, TokenHash};
use crate::chat::{ChatId, UserId};
use crate::codec::{DecodeError, Reader};

/// Chats one hand-out may cover. Why: one `getUpdates` answers at most
/// [`HANDOUT_UPDATES_MAX`] updates, so more ranges than that could never be read.
pub const HANDOUT_RANGES_MAX: usize = 100;
/// Updates one hand-out may name (Telegram's `getUpdates` limit is 100 too).
pub const HANDOUT_UPDATES_MAX: u64 = 100;
/// Hand-out ranges a bot may hold unconfirmed. Why: the gateway hands out only when the
/// previous ones are confirmed, so this is only reached by a misbehaving proposer; it
/// bounds the state per bot (32 bytes per range).
pub const PENDING_RANGES_MAX: usize = 1024;
/// Longest webhook URL (Telegram allows about 2 KiB as well).
pub const WEBHOOK_URL_BYTES_MAX: usize = 2048;
/// Longest webhook secret token (Telegram: 1 to 256 characters).
pub const WEBHOOK_SECRET_BYTES_MAX: usize = 256;
/// The device id of a bot's API session (bots have no other sessions).
pub const BOT_DEVICE_ID: &str = "bot-api";

/// One chat's seq range handed out under consecutive update ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandOutRange {
    /// The chat.
    pub chat: ChatId,
    /// First seq (inclusive).
    pub from_seq: u64,
    /// Last seq (inclusive).
    pub to_seq: u64,
}

impl HandOutRange {
    fn len(&self) -> u64 {
        self.to_seq - self.from_seq + 1
    }
}

/// A hand-out as kept until confirmed: update ids `first_update_id..` name the range's
/// seqs in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRange {
    /// The update id of `range.from_seq`.
    pub first_update_id: u64,
    /// The chat and seqs.
    pub range: HandOutRange,
}

impl PendingRange {
    /// The update id after the last one of this range.
    pub fn end_update_id(&self) -> u64 {
        self.first_update_id + self.range.len()
    }
}

/// A bot's webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Where updates are POSTed (`http://` only; the gateway checks).
    pub url: String,
    /// Sent in `X-Chatlog-Bot-Api-Secret-Token`; empty for none. Replicated in the
    /// clear: the server must present it, so it cannot keep only a hash.
    pub secret_token: String,
}

/// One bot's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bot {
    owner: UserId,
    webhook: Option<Webhook>,
    /// The id the next hand-out starts at (ids start at 1).
    next_update_id: u64,
    /// Every update id below this is confirmed.
    confirmed: u64,
    /// Per chat, the last seq handed out.
    cursors: BTreeMap<ChatId, u64>,
    /// Handed out, not confirmed, in update id order.
    pending: VecDeque<PendingRange>,
}

impl Bot {
    /// The user who created the bot.
    pub fn owner(&self) -> UserId {
        self.owner
    }
    /// The webhook, if set.
    pub fn webhook(&self) -> Option<&Webhook> {
        self.webhook.as_ref()
    }
    /// The id the next hand-out starts at.
    pub fn next_update_id(&self) -> u64 {
        self.next_update_id
    }
    /// Every update id below this is confirmed.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }
    /// The last seq of `chat` handed out (0 if none).
    pub fn cursor(&self, chat: ChatId) -> Option<u64> {
        self.cursors.get(&chat).copied()
    }
    /// Handed out and not confirmed, in update id order.
    pub fn pending(&self) -> impl Iterator<Item = &PendingRange> {
        self.pending.iter()
    }
    /// Updates handed out and not confirmed.
    pub fn pending_updates(&self) -> u64 {
        self.pending.iter().map(|p| p.range.len()).sum()
    }
}

/// Every bot of a group (those whose user lives in it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bots {
    bots: BTreeMap<UserId, Bot>,
}

/// The bot commands (tags 60-69).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BotCommand {
    /// Creates a bot user named `name` in this group (the name's group) owned by `owner`,
    /// with one API session whose token hash is `token_hash`. Answers `UserCreated`.
    Create {
        /// The user creating it (authenticated by the gateway).
        owner: UserId,
        /// The bot's handle (same rules as a user's).
        name: String,
        /// Hash of the token's secret part.
        token_hash: TokenHash,
    },
    /// Assigns the next update ids to `ranges`, in order. Answers `BotDone` with the
    /// first id. Refused (`Conflict`) when a range does not start after its chat's
    /// cursor: that seq already has an id.
    HandOut {
        /// The bot.
        bot: UserId,
        /// The chats and seqs, each chat at most once.
        ranges: Vec<HandOutRange>,
    },
    /// Confirms every update id below `offset` (clamped to what was handed out).
    /// Answers `BotDone` with the confirmed offset.
    Confirm {
        /// The bot.
        bot: UserId,
        /// Ids below it are confirmed.
        offset: u64,
    },
    /// Sets (non-empty `url`) or removes (empty) the bot's webhook. Answers `BotDone`.
    SetWebhook {
        /// The bot.
        bot: UserId,
        /// The URL, empty to remove.
        url: String,
        /// The secret header's value.
        secret_token: String,
    },
    /// Replaces the bot's token (its owner only): every earlier API session ends.
    /// Answers `BotDone` with the new session id.
    SetToken {
        /// The bot.
        bot: UserId,
        /// Who asks; must be the owner.
        owner: UserId,
        /// Hash of the new token's secret part.
        token_hash: TokenHash,
    },
}

pub(crate) mod tag {
    pub const CREATE: u8 = 60;
    pub const HAND_OUT: u8 = 61;
    pub const CONFIRM: u8 = 62;
    pub const SET_WEBHOOK: u8 = 63;
    pub const SET_TOKEN: u8 = 64;
    /// Every tag this module owns.
    pub const RANGE: std::ops::RangeInclusive<u8> = 60..=69;
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn read_hash(r: &mut Reader<'_>) -> Result<TokenHash, DecodeError> {
    let mut h = [0u8; 32];
    h.copy_from_slice(r.bytes(32)?);
    Ok(h)
}

impl BotCommand {
    /// Appends the command's bytes (tag and fields).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            BotCommand::Create {
                owner,
                name,
                token_hash,
            } => {
                out.push(tag::CREATE);
                put_u64(out, *owner);
                put_str(out, name);
                out.extend_from_slice(token_hash);
            }
            BotCommand::HandOut { bot, ranges } => {
                out.push(tag::HAND_OUT);
                put_u64(out, *bot);
                out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for r in ranges {
                    put_u64(out, r.chat);
                    put_u64(out, r.from_seq);
                    put_u64(out, r.to_seq);
                }
            }
            BotCommand::Confirm { bot, offset } => {
                out.push(tag::CONFIRM);
                put_u64(out, *bot);
                put_u64(out, *offset);
            }
            BotCommand::SetWebhook {
                bot,
                url,
                secret_token,
            } => {
                out.push(tag::SET_WEBHOOK);
                put_u64(out, *bot);
                put_str(out, url);
                put_str(out, secret_token);
            }
            BotCommand::SetToken {
                bot,
                owner,
                token_hash,
            } => {
                out.push(tag::SET_TOKEN);
                put_u64(out, *bot);
                put_u64(out, *owner);
                out.extend_from_slice(token_hash);
            }
        }
    }

    /// Decodes the fields after tag `tag` (one of [`tag::RANGE`]).
    pub(crate) fn decode(tag_byte: u8, r: &mut Reader<'_>) -> Result<BotCommand, DecodeError> {
        let s = crate::chat::command::COMMAND_STRING_BYTES_MAX;
        Ok(match tag_byte {
            tag::CREATE => BotCommand::Create {
                owner: r.u64()?,
                name: r.string(s)?,
                token_hash: read_hash(r)?,
            },
            tag::HAND_OUT => {
                let bot = r.u64()?;
                let n = r.item_count(24, HANDOUT_RANGES_MAX)?;
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push(HandOutRange {
                        chat: r.u64()?,
                        from_seq: r.u64()?,
                        to_seq: r.u64()?,
                    });
                }
                BotCommand::HandOut { bot, ranges }
            }
            tag::CONFIRM => BotCommand::Confirm {
                bot: r.u64()?,
                offset: r.u64()?,
            },
            tag::SET_WEBHOOK => BotCommand::SetWebhook {
                bot: r.u64()?,
                url: r.string(s)?,
                secret_token: r.string(s)?,
            },
            tag::SET_TOKEN => BotCommand::SetToken {
                bot: r.u64()?,
                owner: r.u64()?,
                token_hash: read_hash(r)?,
            },
            other => {
                return Err(DecodeError::new(
                    "chat command",
                    format!("unknown bot command tag {other}"),
                ));
            }
        })
    }
}

fn refuse(code: RefusalCode, msg: impl Into<String>) -> Outcome {
    Outcome::refused(code, msg)
}

fn done(bot: UserId, value: u64) -> Outcome {
    Outcome::BotDone { bot, value }
}

impl Bots {
    /// The bot `bot`, if it lives in this group.
    pub fn get(&self, bot: UserId) -> Option<&Bot> {
        self.bots.get(&bot)
    }

    /// Every bot of the group, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (UserId, &Bot)> {
        self.bots.iter().map(|(id, b)| (*id, b))
    }

    /// Records a new bot (its user was just created by the caller).
    pub(crate) fn insert(&mut self, bot: UserId, owner: UserId) {
        self.bots.insert(
            bot,
            Bot {
                owner,
                webhook: None,
                next_update_id: 1,
                confirmed: 1,
                cursors: BTreeMap::new(),
                pending: VecDeque::new(),
            },
        );
    }

    /// Applies a bot command other than `Create` and `SetToken` (which change users and
    /// are applied by `GroupState`).
    pub(crate) fn apply(&mut self, cmd: &BotCommand) -> Outcome {
        match cmd {
            BotCommand::HandOut { bot, ranges } => {
                let Some(b) = self.bots.get_mut(bot) else {
                    return refuse(RefusalCode::NotFound, format!("no bot {bot}"));
                };
                if ranges.is_empty() || ranges.len() > HANDOUT_RANGES_MAX {
                    return refuse(
                        RefusalCode::BadRequest,
                        format!("a hand-out covers 1 to {HANDOUT_RANGES_MAX} chats"),
                    );
                }
                if b.pending.len() + ranges.len() > PENDING_RANGES_MAX {
                    return refuse(
                        RefusalCode::Conflict,
                        "too many updates handed out and not confirmed",
                    );
                }
                let mut total = 0u64;
                for (i, r) in ranges.iter().enumerate() {
                    if r.from_seq == 0 || r.from_seq > r.to_seq {
                        return refuse(
                            RefusalCode::BadRequest,
                            format!("seq range {}..={} is empty", r.from_seq, r.to_seq),
                        );
                    }
                    if ranges[..i].iter().any(|o| o.chat == r.chat) {
                        return refuse(
                            RefusalCode::BadRequest,
                            format!("chat {} named twice", r.chat),
                        );
                    }
                    // The negative space: a seq that already has an id never gets another.
                    if let Some(c) = b.cursors.get(&r.chat)
                        && r.from_seq <= *c
                    {
                        return refuse(
                            RefusalCode::Conflict,
                            format!(
                                "chat {} is handed out up to seq {c}; seq {} already has an id",
                                r.chat, r.from_seq
                            ),
                        );
                    }
                    total = total.saturating_add(r.len());
                }
                if total > HANDOUT_UPDATES_MAX {
                    return refuse(
                        RefusalCode::BadRequest,
                        format!("{total} updates in one hand-out, at most {HANDOUT_UPDATES_MAX}"),
                    );
                }
                let first = b.next_update_id;
                for r in ranges {
                    b.pending.push_back(PendingRange {
                        first_update_id: b.next_update_id,
                        range: *r,
                    });
                    b.next_update_id += r.len();
                    b.cursors.insert(r.chat, r.to_seq);
                }
                done(*bot, first)
            }
            BotCommand::Confirm { bot, offset } => {
                let Some(b) = self.bots.get_mut(bot) else {
                    return refuse(RefusalCode::NotFound, format!("no bot {bot}"));
                };
                // Ids never handed out cannot be confirmed: they will name future events.
                let offset = (*offset).clamp(b.confirmed, b.next_update_id);
                while let Some(front) = b.pending.front_mut() {
                    if front.end_update_id() <= offset {
                        b.pending.pop_front();
                    } else {
                        if front.first_update_id < offset {
                            let skip = offset - front.first_update_id;
                            front.first_update_id = offset;
                            front.range.from_seq += skip;
                        }
                        break;
                    }
                }
                b.confirmed = offset;
                done(*bot, offset)
            }
            BotCommand::SetWebhook {
                bot,
                url,
                secret_token,
            } => {
                let Some(b) = self.bots.get_mut(bot) else {
                    return refuse(RefusalCode::NotFound, format!("no bot {bot}"));
                };
                if url.len() > WEBHOOK_URL_BYTES_MAX
                    || secret_token.len() > WEBHOOK_SECRET_BYTES_MAX
                {
                    return refuse(
                        RefusalCode::BadRequest,
                        "webhook url or secret token over its limit",
                    );
                }
                b.webhook = (!url.is_empty()).then(|| Webhook {
                    url: url.clone(),
                    secret_token: secret_token.clone(),
                });
                done(*bot, 0)
            }
            BotCommand::Create { .. } | BotCommand::SetToken { .. } => refuse(
                RefusalCode::BadRequest,
                "applied by the group state, not the bot table",
            ),
        }
    }

    /// Appends the checkpoint bytes (see the module docs).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        put_u64(out, self.bots.len() as u64);
        for (id, b) in &self.bots {
            put_u64(out, *id);
            put_u64(out, b.owner);
            put_u64(out, b.next_update_id);
            put_u64(out, b.confirmed);
            match &b.webhook {
                None => out.push(0),
                Some(w) => {
                    out.push(1);
                    put_str(out, &w.url);
                    put_str(out, &w.secret_token);
                }
            }
            put_u64(out, b.cursors.len() as u64);
            for (c, s) in &b.cursors {
                put_u64(out, *c);
                put_u64(out, *s);
            }
            put_u64(out, b.pending.len() as u64);
            for p in &b.pending {
                put_u64(out, p.first_update_id);
                put_u64(out, p.range.chat);
                put_u64(out, p.range.from_seq);
                put_u64(out, p.range.to_seq);
            }
        }
    }

    /// Decodes what [`Bots::encode_into`] wrote.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Bots, DecodeError> {
        let count = |r: &mut Reader<'_>, item: usize| -> Result<usize, DecodeError> {
            let n = r.u64()? as usize;
            if n.saturating_mul(item) > r.remaining() {
                return Err(DecodeError::new(
                    "bot state",
                    format!("count {n} exceeds the bytes left"),
                ));
            }
            Ok(n)
        };
        let s = WEBHOOK_URL_BYTES_MAX.max(WEBHOOK_SECRET_BYTES_MAX);
        let mut bots = BTreeMap::new();
        for _ in 0..count(r, 33)? {
            let id = r.u64()?;
            let owner = r.u64()?;
            let next_update_id = r.u64()?;
            let confirmed = r.u64()?;
            let webhook = match r.u8()? {
                0 => None,
                1 => Some(Webhook {
                    url: r.string(s)?,
                    secret_token: r.string(s)?,
                }),
                b => {
                    return Err(DecodeError::new(
                        "bot state",
                        format!("webhook flag {b} is not 0 or 1"),
                    ));
                }
            };
            let mut cursors = BTreeMap::new();
            for _ in 0..count(r, 16)? {
                cursors.insert(r.u64()?, r.u64()?);
            }
            let mut pending = VecDeque::new();
            for _ in 0..count(r, 32)? {
                let p = PendingRange {
                    first_update_id: r.u64()?,
                    range: HandOutRange {
                        chat: r.u64()?,
                        from_seq: r.u64()?,
                        to_seq: r.u64()?,
                    },
                };
                if p.range.from_seq == 0
                    || p.range.from_seq > p.range.to_seq
                    || p.end_update_id() > next_update_id
                {
                    return Err(DecodeError::new(
                        "bot state",
                        format!("pending range {p:?} of bot {id} is inconsistent"),
                    ));
                }
                pending.push_back(p);
            }
            if confirmed > next_update_id {
                return Err(DecodeError::new(
                    "bot state",
                    format!("bot {id} confirmed {confirmed} beyond {next_update_id}"),
                ));
            }
            bots.insert(
                id,
                Bot {
                    owner,
                    webhook,
                    next_update_id,
                    confirmed,
                    cursors,
                    pending,
                },
            );
        }
        Ok(Bots { bots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bots_with_one() -> Bots {
        let mut b = Bots::default();
        b.insert(7, 3);
        b
    }

    fn hand_out(b: &mut Bots, ranges: &[(u64, u64, u64)]) -> Outcome {
        b.apply(&BotCommand::HandOut {
            bot: 7,
            ranges: ranges
                .iter()
                .map(|&(chat, from_seq, to_seq)| HandOutRange {
                    chat,
                    from_seq,
                    to_seq,
                })
                .collect(),
        })
    }

    #[test]
    fn ids_are_handed_out_once_and_confirmed_in_order() {
        let mut b = bots_with_one();
        assert_eq!(
            hand_out(&mut b, &[(100, 1, 3), (200, 5, 5)]),
            done(7, 1),
            "ids 1..=3 for chat 100, 4 for chat 200"
        );
        // The same seqs again: refused, they have ids.
        assert!(matches!(
            hand_out(&mut b, &[(100, 3, 4)]),
            Outcome::Refused(r) if r.code == RefusalCode::Conflict
        ));
        assert_eq!(hand_out(&mut b, &[(100, 4, 4)]), done(7, 5));
        let bot = b.get(7).expect("bot");
        assert_eq!(bot.pending_updates(), 5);
        assert_eq!(bot.next_update_id(), 6);
        // Confirm through id 2: the first range is trimmed, not dropped.
        assert_eq!(
            b.apply(&BotCommand::Confirm { bot: 7, offset: 3 }),
            done(7, 3)
        );
        let bot = b.get(7).expect("bot");
        let first = bot.pending().next().expect("pending");
        assert_eq!(first.first_update_id, 3);
        assert_eq!(first.range.from_seq, 3);
        assert_eq!(bot.pending_updates(), 3);
        // A lower offset changes nothing; one past what was handed out is clamped.
        assert_eq!(
            b.apply(&BotCommand::Confirm { bot: 7, offset: 1 }),
            done(7, 3)
        );
        assert_eq!(
            b.apply(&BotCommand::Confirm {
                bot: 7,
                offset: 1000
            }),
            done(7, 6)
        );
        assert_eq!(b.get(7).expect("bot").pending_updates(), 0);
        // The next hand-out continues the ids.
        assert_eq!(hand_out(&mut b, &[(300, 1, 1)]), done(7, 6));
    }

    #[test]
    fn bad_hand_outs_are_refused() {
        let mut b = bots_with_one();
        for bad in [
            vec![],
            vec![(1, 0, 1)],
            vec![(1, 3, 2)],
            vec![(1, 1, 1), (1, 2, 2)],
            vec![(1, 1, 101)],
        ] {
            assert!(
                matches!(hand_out(&mut b, &bad), Outcome::Refused(_)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            b.apply(&BotCommand::Confirm { bot: 8, offset: 1 }),
            Outcome::Refused(r) if r.code == RefusalCode::NotFound
        ));
        assert_eq!(
            b.get(7).expect("bot").next_update_id(),
            1,
            "nothing changed"
        );
    }

    #[test]
    fn state_round_trips_and_truncations_fail() {
        let mut b = bots_with_one();
        b.insert(9, 3);
        hand_out(&mut b, &[(100, 1, 3), (200, 5, 5)]);
        b.apply(&BotCommand::Confirm { bot: 7, offset: 2 });
        b.apply(&BotCommand::SetWebhook {
            bot: 9,
            url: "http://127.0.0.1:1/hook".into(),
            secret_token: "s3".into(),
        });
        let mut bytes = Vec::new();
        b.encode_into(&mut bytes);
        let mut r = Reader::new("bot state", &bytes);
        assert_eq!(Bots::decode(&mut r).expect("decodes"), b);
        r.finish().expect("all read");
        for len in 0..bytes.len() {
            let mut r = Reader::new("bot state", &bytes[..len]);
            assert!(Bots::decode(&mut r).is_err(), "prefix of {len} decoded");
        }
    }

    #[test]
    fn bots_are_users_with_an_owner_a_session_and_checkpointed_cursors() {
        use crate::chat::command::Command;
        use crate::chat::state::GroupState;
        let mut st = GroupState::new(2);
        let mut index = 0;
        let mut run = |st: &mut GroupState, c: BotCommand| {
            index += 1;
            st.apply(&Command::Bot(c), 1_000 + index, index, 0)
        };
        let Outcome::UserCreated { user: bot } = run(
            &mut st,
            BotCommand::Create {
                owner: 99,
                name: "echo_bot".into(),
                token_hash: [7; 32],
            },
        ) else {
            panic!("bot created");
        };
        // A user like any other: the handle is taken, the token is a session.
        assert_eq!(st.user_by_name("echo_bot"), Some(bot));
        let session = st.session_by_token(bot, &[7; 32]).expect("API session");
        assert!(matches!(
            run(
                &mut st,
                BotCommand::Create {
                    owner: 99,
                    name: "echo_bot".into(),
                    token_hash: [8; 32],
                }
            ),
            Outcome::Refused(r) if r.code == RefusalCode::Conflict
        ));
        // Only the owner replaces the token; the old session ends.
        assert!(matches!(
            run(&mut st, BotCommand::SetToken { bot, owner: 98, token_hash: [9; 32] }),
            Outcome::Refused(r) if r.code == RefusalCode::PermissionDenied
        ));
        assert!(matches!(
            run(
                &mut st,
                BotCommand::SetToken {
                    bot,
                    owner: 99,
                    token_hash: [9; 32]
                }
            ),
            Outcome::BotDone { .. }
        ));
        assert!(!st.has_session(bot, session));
        assert!(st.session_by_token(bot, &[7; 32]).is_none());
        assert!(st.session_by_token(bot, &[9; 32]).is_some());
        run(
            &mut st,
            BotCommand::HandOut {
                bot,
                ranges: vec![HandOutRange {
                    chat: 5,
                    from_seq: 2,
                    to_seq: 4,
                }],
            },
        );
        run(
            &mut st,
            BotCommand::SetWebhook {
                bot,
                url: "http://127.0.0.1:9/h".into(),
                secret_token: "s".into(),
            },
        );
        // The checkpoint carries the bots, byte-identically.
        let bytes = st.encode();
        let back = GroupState::decode(&bytes).expect("decodes");
        assert_eq!(back, st);
        assert_eq!(back.encode(), bytes);
        let b = back.bots().get(bot).expect("bot");
        assert_eq!(
            (b.owner(), b.next_update_id(), b.cursor(5)),
            (99, 4, Some(4))
        );
        assert_eq!(
            b.webhook().map(|w| w.url.as_str()),
            Some("http://127.0.0.1:9/h")
        );
    }

    #[test]
    fn commands_round_trip() {
        let cmds = [
            BotCommand::Create {
                owner: 1,
                name: "echo_bot".into(),
                token_hash: [4; 32],
            },
            BotCommand::HandOut {
                bot: 2,
                ranges: vec![HandOutRange {
                    chat: 3,
                    from_seq: 4,
                    to_seq: 5,
                }],
            },
            BotCommand::Confirm { bot: 2, offset: 9 },
            BotCommand::SetWebhook {
                bot: 2,
                url: "http://x/".into(),
                secret_token: String::new(),
            },
            BotCommand::SetToken {
                bot: 2,
                owner: 1,
                token_hash: [5; 32],
            },
        ];
        for c in cmds {
            let mut out = Vec::new();
            c.encode_into(&mut out);
            let mut r = Reader::new("chat command", &out[1..]);
            assert_eq!(BotCommand::decode(out[0], &mut r).expect("decodes"), c);
            r.finish().expect("all read");
        }
    }
}
