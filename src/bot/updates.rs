//! Updates: which events a bot gets under which ids, read back from the chats' logs.
//!
//! What it owns: choosing what to hand out next (per chat of the bot, the seqs after its
//! cursor, never before the bot joined), committing that choice before anything is sent
//! (`BotCommand::HandOut`), confirming (`BotCommand::Confirm`), reading the events an id
//! range names and shaping them as JSON, and `getUpdates` with its long poll. What it
//! must not do: number updates in memory, or send an update whose id is not committed.
//!
//! Order. Ids grow with every hand-out; within one hand-out each chat's range is
//! consecutive and in seq order, and a chat's next range starts after its cursor, so a
//! bot reading ids in order reads every chat's events in order.
//!
//! Limits of this slice: a bot removed from a chat no longer gets that chat's events,
//! including (usually) the removal itself, since hand-outs happen while the bot is a
//! member. A waiting poll (or webhook loop) wakes after every apply of any local group
//! and compares each of its chats' heads with its cursor: O(chats of the bot) per
//! wake-up, no log read without news; a feed of changed chats from apply would remove
//! the scan (the fan-out hub has the same one). A chat joins the bot's list through the
//! bot user's own log, which the service updates after the invite commits (see
//! `service/mod.rs`: a crash in between leaves the chat out until the next change).

use std::time::Duration;

use chatlog_raft::chat::bot::{BotCommand, HANDOUT_RANGES_MAX, HandOutRange, PendingRange};
use chatlog_raft::chat::{Command, UserId};
use chatlog_wire::proto::v1::{self, event::Body};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::methods::u64_param;
use super::{BotApi, BotError, LONG_POLL_TIMEOUT_S_MAX, Params, UPDATES_LIMIT_MAX, bot_chats};
use crate::client_cmd::output::event_json;
use crate::service::convert;

/// One update: its id and the event it names.
#[derive(Debug, Clone)]
pub struct Update {
    /// The update id.
    pub update_id: u64,
    /// The chat event.
    pub event: v1::Event,
    /// Whether the event's sender is a bot (as far as this node can tell: its group is
    /// hosted here).
    pub sender_is_bot: bool,
}

impl Update {
    /// The update as JSON: `update_id`, the event (`event`, shaped like the CLI's
    /// `--json` events) and, for messages and edits, Telegram's `message` and
    /// `edited_message` objects.
    pub fn to_json(&self) -> Value {
        let e = &self.event;
        let mut v = json!({"update_id": self.update_id, "event": event_json(e)});
        match &e.body {
            Some(Body::MessagePosted(m)) => {
                let mut msg = super::methods::message_json(
                    e.chat_id,
                    e.seq,
                    e.sender_id,
                    e.timestamp_ms,
                    &m.text,
                );
                msg["from"]["is_bot"] = json!(self.sender_is_bot);
                if m.reply_to_seq != 0 {
                    msg["reply_to_message_id"] = json!(m.reply_to_seq);
                }
                if m.erased {
                    msg["erased"] = json!(true);
                }
                v["message"] = msg;
            }
            Some(Body::MessageEdited(m)) => {
                let mut msg = super::methods::message_json(
                    e.chat_id,
                    m.target_seq,
                    e.sender_id,
                    e.timestamp_ms,
                    &m.text,
                );
                msg["from"]["is_bot"] = json!(self.sender_is_bot);
                msg["edit_date"] = json!(e.timestamp_ms / 1000);
                v["edited_message"] = msg;
            }
            _ => {}
        }
        v
    }
}

/// Reads the updates with ids `from_id..` of `pending`, at most `limit`, from the chats'
/// logs.
async fn read_pending(
    api: &BotApi,
    pending: &[PendingRange],
    from_id: u64,
    limit: u64,
) -> Result<Vec<Update>, BotError> {
    let mut out = Vec::new();
    for p in pending {
        if out.len() as u64 >= limit {
            break;
        }
        if p.end_update_id() <= from_id {
            continue;
        }
        let skip = from_id.saturating_sub(p.first_update_id);
        let from_seq = p.range.from_seq + skip;
        let room = limit - out.len() as u64;
        let to_seq = p.range.to_seq.min(from_seq + room - 1);
        let chat = p.range.chat;
        let group = api.group(chat, "chat")?;
        let locs = group
            .shared()
            .read()
            .chat_events(chat, from_seq, to_seq)
            .unwrap_or_default();
        if locs.len() as u64 != to_seq - from_seq + 1 {
            return Err(BotError::new(
                500,
                format!("chat {chat} lacks events {from_seq}..={to_seq} that were handed out"),
            ));
        }
        let rows = group
            .read_commands(&locs)
            .await
            .map_err(|e| BotError::new(500, format!("reading chat {chat}: {e}")))?;
        for (seq, loc, cmd, ts) in rows {
            let event = convert::chat_event(chat, seq, &loc, &cmd, ts).ok_or_else(|| {
                BotError::new(
                    500,
                    format!("event {seq} of chat {chat} does not match its command"),
                )
            })?;
            let sender_is_bot = api
                .group(event.sender_id, "user")
                .is_ok_and(|g| g.shared().read().bots().get(event.sender_id).is_some());
            out.push(Update {
                update_id: p.first_update_id + (seq - p.range.from_seq),
                event,
                sender_is_bot,
            });
        }
    }
    Ok(out)
}

/// Per chat of the bot, the seqs waiting for a hand-out: `(chat, first, head)`.
fn waiting(api: &BotApi, bot: UserId) -> Result<Vec<(u64, u64, u64)>, BotError> {
    let chats = bot_chats(api, bot)?;
    let cursors: Vec<Option<u64>> = {
        let g = api.group(bot, "bot")?;
        let st = g.shared().read();
        let b = st
            .bots()
            .get(bot)
            .ok_or_else(|| BotError::new(401, "invalid bot token"))?;
        chats.iter().map(|c| b.cursor(*c)).collect()
    };
    let mut out = Vec::new();
    for (chat, cursor) in chats.into_iter().zip(cursors) {
        let Ok(group) = api.group(chat, "chat") else {
            continue;
        };
        let st = group.shared().read();
        let Some(head) = st.head_seq(chat) else {
            continue;
        };
        // Only while a member, and never from before the bot joined.
        let joined = match st.members(chat, bot.saturating_sub(1), 1) {
            Some((m, _)) if m.first().is_some_and(|m| m.user == bot) => m[0].joined_seq,
            _ => continue,
        };
        let first = cursor.map_or(joined, |c| (c + 1).max(joined)).max(1);
        if first <= head {
            out.push((chat, first, head));
        }
    }
    Ok(out)
}

/// Updates of the bot's chats not handed out yet (for `getWebhookInfo`).
pub(crate) fn not_handed_out(api: &BotApi, bot: UserId) -> Result<u64, BotError> {
    Ok(waiting(api, bot)?
        .iter()
        .map(|(_, first, head)| head - first + 1)
        .sum())
}

/// Hands out up to `limit` new updates; false when there is nothing new. Each chat with
/// news gets a fair share of `limit` (at least one), so one busy chat cannot starve the
/// others.
pub(crate) async fn hand_out(api: &BotApi, bot: UserId, limit: u64) -> Result<bool, BotError> {
    let mut news = waiting(api, bot)?;
    if news.is_empty() {
        return Ok(false);
    }
    news.truncate(HANDOUT_RANGES_MAX.min(limit as usize));
    let share = (limit / news.len() as u64).max(1);
    let ranges: Vec<HandOutRange> = news
        .into_iter()
        .map(|(chat, first, head)| HandOutRange {
            chat,
            from_seq: first,
            to_seq: head.min(first + share - 1),
        })
        .collect();
    match api
        .propose(bot, Command::Bot(BotCommand::HandOut { bot, ranges }))
        .await
    {
        Ok(_) => Ok(true),
        // Another hand-out (a webhook loop on a former leader) won the race: look again.
        Err(e) if e.status == 409 => Ok(true),
        Err(e) => Err(e),
    }
}

/// The bot's unconfirmed hand-outs and its confirmed offset.
pub(crate) fn pending(api: &BotApi, bot: UserId) -> Result<(Vec<PendingRange>, u64), BotError> {
    let g = api.group(bot, "bot")?;
    let st = g.shared().read();
    let b = st
        .bots()
        .get(bot)
        .ok_or_else(|| BotError::new(401, "invalid bot token"))?;
    Ok((b.pending().copied().collect(), b.confirmed()))
}

/// Confirms every update below `offset` (a no-op when it confirms nothing new).
pub(crate) async fn confirm(api: &BotApi, bot: UserId, offset: u64) -> Result<(), BotError> {
    let (_, confirmed) = pending(api, bot)?;
    if offset > confirmed {
        api.propose(bot, Command::Bot(BotCommand::Confirm { bot, offset }))
            .await?;
    }
    Ok(())
}

/// Waits for the next batch of updates from `offset` on (confirming those below it),
/// until `timeout`; an empty list when none came. A change of `superseded` (a newer poll
/// of the same bot) ends the wait with 409.
pub(crate) async fn next_updates(
    api: &BotApi,
    bot: UserId,
    offset: u64,
    limit: u64,
    timeout: Duration,
    mut superseded: Option<watch::Receiver<u64>>,
) -> Result<Vec<Update>, BotError> {
    let deadline = tokio::time::Instant::now() + timeout;
    confirm(api, bot, offset).await?;
    let mut applied = api.applied();
    loop {
        applied.borrow_and_update();
        let (pending, confirmed) = pending(api, bot)?;
        if !pending.is_empty() {
            let got = read_pending(api, &pending, offset.max(confirmed), limit).await?;
            if !got.is_empty() {
                return Ok(got);
            }
        } else if hand_out(api, bot, limit).await? {
            continue;
        }
        let newer = async {
            match superseded.as_mut() {
                Some(s) => {
                    let _ = s.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            waited = tokio::time::timeout_at(deadline, applied.changed()) => {
                if waited.is_err() {
                    return Ok(Vec::new());
                }
            }
            () = newer => return Err(super::superseded()),
        }
    }
}

/// `getUpdates`: `offset` (confirms every id below it), `limit` (1 to 100, default
/// 100), `timeout` (seconds of long poll, 0 to [`LONG_POLL_TIMEOUT_S_MAX`]).
pub(crate) async fn get_updates(
    api: &BotApi,
    bot: UserId,
    p: &Params,
    superseded: Option<watch::Receiver<u64>>,
) -> Result<Value, BotError> {
    if let Some(Value::Number(n)) = p.get("offset")
        && n.as_i64().is_some_and(|o| o < 0)
    {
        return Err(BotError::bad("negative offsets are not supported"));
    }
    let offset = u64_param(p, "offset")?.unwrap_or(0);
    let limit = u64_param(p, "limit")?.unwrap_or(UPDATES_LIMIT_MAX);
    if limit == 0 || limit > UPDATES_LIMIT_MAX {
        return Err(BotError::bad(format!(
            "limit must be 1 to {UPDATES_LIMIT_MAX}"
        )));
    }
    let timeout = u64_param(p, "timeout")?.unwrap_or(0);
    if timeout > LONG_POLL_TIMEOUT_S_MAX {
        return Err(BotError::bad(format!(
            "timeout must be 0 to {LONG_POLL_TIMEOUT_S_MAX} seconds"
        )));
    }
    {
        let g = api.group(bot, "bot")?;
        if g.shared()
            .read()
            .bots()
            .get(bot)
            .and_then(|b| b.webhook())
            .is_some()
        {
            return Err(BotError::new(
                409,
                "can't use getUpdates method while webhook is active; use deleteWebhook to \
                 delete the webhook first",
            ));
        }
    }
    let timeout = Duration::from_secs(timeout);
    let updates = next_updates(api, bot, offset, limit, timeout, superseded).await?;
    Ok(Value::Array(updates.iter().map(Update::to_json).collect()))
}
