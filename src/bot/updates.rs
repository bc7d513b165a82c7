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
//! the scan (the fan-out hub has the same one).
//!
//! Chats of groups this node does not serve are asked of a replica of their group with
//! the node message the chat service uses for syncs (`SyncPart`: heads and the bot's
//! joined seqs, then the events of a handed-out range, as the bot, which must still be a
//! member: a range of a chat it left is skipped). Their news wakes no local apply, so a
//! waiting poll of such a bot looks again every [`REMOTE_RECHECK`]: one small request
//! per such group per second. Whether a sender of a group not served here is a bot is
//! asked of a replica of its group once (`bot_check`) and remembered. A chat joins the bot's list through the
//! bot user's own log, which the service updates after the invite commits (see
//! `service/mod.rs`: a crash in between leaves the chat out until the next change).

use std::collections::HashMap;
use std::time::Duration;

use chatlog_raft::GroupId;
use chatlog_raft::chat::bot::{BotCommand, HANDOUT_RANGES_MAX, HandOutRange, PendingRange};
use chatlog_raft::chat::{ChatId, Command, UserId, group_of};
use chatlog_wire::limits::PAGE_ITEMS_MAX;
use chatlog_wire::proto::node::v1::SyncPart;
use chatlog_wire::proto::v1::{self, event::Body};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::methods::u64_param;
use super::{
    BotApi, BotError, LONG_POLL_TIMEOUT_S_MAX, Params, SENDER_KINDS_MAX, UPDATES_LIMIT_MAX,
    bot_chats, lock,
};
use crate::client_cmd::output::event_json;
use crate::service::forward::{bots_among, send_sync_part, sync_part_of};
use crate::service::{PAGE_BYTES_MAX, SyncAsk, add_by_group, convert};

/// Longest a waiting poll (or webhook loop) of a bot with chats in groups this node does
/// not serve goes without looking at them again. Why: their news wakes no local apply;
/// a second is what a person waits for a bot's answer without noticing, and costs one
/// small request per such group per second.
pub const REMOTE_RECHECK: Duration = Duration::from_secs(1);

/// One update: its id and the event it names.
#[derive(Debug, Clone)]
pub struct Update {
    /// The update id.
    pub update_id: u64,
    /// The chat event.
    pub event: v1::Event,
    /// Whether the event's sender is a bot (asked of a replica of the sender's group
    /// when this node serves none; a person when none answers).
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
    bot: UserId,
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
        if let Some(g) = elsewhere(api, chat) {
            // Read from a replica of the chat's group: a page may stop short (bytes), and
            // the ids after a short range must wait, so the answer ends there. A bot
            // removed from the chat since reads nothing of it there: the range is skipped.
            let Some(events) = read_elsewhere(api, bot, g, chat, from_seq, to_seq).await? else {
                continue;
            };
            let short = events.len() as u64 != to_seq - from_seq + 1;
            for event in events {
                out.push(Update {
                    update_id: p.first_update_id + (event.seq - p.range.from_seq),
                    event,
                    sender_is_bot: false,
                });
            }
            if short {
                break;
            }
            continue;
        }
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
            out.push(Update {
                update_id: p.first_update_id + (seq - p.range.from_seq),
                event,
                sender_is_bot: false,
            });
        }
    }
    mark_bots(api, &mut out).await;
    Ok(out)
}

/// Sets each update's `sender_is_bot`: from this node's replica of the sender's group,
/// or else as a replica of it answers (remembered: a user never becomes a bot or stops
/// being one). A sender no replica answers for is taken for a person.
async fn mark_bots(api: &BotApi, updates: &mut [Update]) {
    let mut far: Vec<(GroupId, Vec<UserId>)> = Vec::new();
    for u in updates.iter_mut() {
        let sender = u.event.sender_id;
        if let Some(g) = api.node.serving_group(group_of(sender)) {
            u.sender_is_bot = g.shared().read().bots().get(sender).is_some();
        } else if let Some(known) = lock(&api.sender_kinds).get(&sender) {
            u.sender_is_bot = *known;
        } else if sender != 0 && !far.iter().any(|(_, users)| users.contains(&sender)) {
            add_by_group(&mut far, group_of(sender), sender);
        }
    }
    if far.is_empty() {
        return;
    }
    for (g, users) in far {
        for page in users.chunks(PAGE_ITEMS_MAX as usize) {
            match bots_among(&api.node, g, page.to_vec()).await {
                Ok(bots) => {
                    let mut kinds = lock(&api.sender_kinds);
                    if kinds.len() + page.len() > SENDER_KINDS_MAX {
                        kinds.clear();
                    }
                    for user in page {
                        kinds.insert(*user, bots.contains(user));
                    }
                }
                Err(e) => tracing::debug!(group = g, error = %e.message, "telling bots apart"),
            }
        }
    }
    let kinds = lock(&api.sender_kinds);
    for u in updates.iter_mut() {
        if let Some(known) = kinds.get(&u.event.sender_id) {
            u.sender_is_bot = *known;
        }
    }
}

/// The group of `chat` when this node serves no replica of it but another node does:
/// the chat is read from there (`read_elsewhere`, `heads_elsewhere`).
fn elsewhere(api: &BotApi, chat: ChatId) -> Option<GroupId> {
    let g = group_of(chat);
    (api.node.serving_group(g).is_none() && api.node.served_elsewhere(g)).then_some(g)
}

/// Events `from..=to` of `chat` (group `g`, not served here) as `bot` reads them, from
/// a replica of `g`: from `from` on, possibly fewer (a page is bounded by bytes); `None`
/// when the bot is no longer a member.
async fn read_elsewhere(
    api: &BotApi,
    bot: UserId,
    g: GroupId,
    chat: ChatId,
    from: u64,
    to: u64,
) -> Result<Option<Vec<v1::Event>>, BotError> {
    let asks = [SyncAsk {
        chat,
        last: from - 1,
        read_seq: 0,
    }];
    let part = SyncPart {
        events_per_chat_max: (to - from + 1).min(u64::from(PAGE_ITEMS_MAX)) as u32,
        bytes_max: PAGE_BYTES_MAX as u64,
        ..sync_part_of(&asks)
    };
    let answer = send_sync_part(&api.node, g, bot, part).await?;
    let Some(d) = answer.differences.into_iter().find(|d| d.chat_id == chat) else {
        return Err(BotError::new(
            500,
            format!("a read of chat {chat} without it"),
        ));
    };
    if d.not_member {
        return Ok(None);
    }
    let events: Vec<v1::Event> = d
        .events
        .into_iter()
        .filter(|e| e.seq >= from && e.seq <= to)
        .collect();
    if events.first().map(|e| e.seq) != Some(from)
        || events.windows(2).any(|w| w[1].seq != w[0].seq + 1)
    {
        return Err(BotError::new(
            500,
            format!("chat {chat} lacks events {from}..={to} that were handed out"),
        ));
    }
    Ok(Some(events))
}

/// Per chat of `chats` (of group `g`, not served here): its head and the seq the bot
/// joined it at, from a replica of `g`; chats the bot is not a member of are left out.
async fn heads_elsewhere(
    api: &BotApi,
    bot: UserId,
    g: GroupId,
    chats: &[ChatId],
    barrier: bool,
) -> Result<Vec<(ChatId, u64, u64)>, BotError> {
    let mut out = Vec::new();
    for page in chats.chunks(PAGE_ITEMS_MAX as usize) {
        let asks: Vec<SyncAsk> = page
            .iter()
            .map(|chat| SyncAsk {
                chat: *chat,
                last: 0,
                read_seq: 0,
            })
            .collect();
        let part = SyncPart {
            events_per_chat_max: 1,
            all: true,
            bytes_max: 0,
            joined_seqs: true,
            no_read_barrier: !barrier,
            ..sync_part_of(&asks)
        };
        let answer = send_sync_part(&api.node, g, bot, part).await?;
        for d in answer.differences.iter().filter(|d| !d.not_member) {
            let joined = page
                .iter()
                .position(|c| *c == d.chat_id)
                .and_then(|i| answer.joined_seqs.get(i))
                .copied()
                .unwrap_or(0);
            if joined > 0 {
                out.push((d.chat_id, d.head_seq, joined));
            }
        }
    }
    Ok(out)
}

/// How a look at the bot's chats treats those of groups not served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elsewhere {
    /// Left out.
    Skip,
    /// Asked of a replica of their group after a read barrier there: a post
    /// acknowledged before the call is seen.
    Linearizable,
    /// Asked of a replica's applied state, without a read barrier (heads at most a
    /// few milliseconds behind): a waiting poll's once-a-second recheck, which would
    /// otherwise cost a quorum round per bot and group every second. The events of
    /// what it finds are read after a barrier, as always.
    Applied,
}

/// Per chat of the bot, the seqs waiting for a hand-out: `(chat, first, head)`. Chats of
/// groups not served here are asked of a replica of theirs as `elsewhere` says.
async fn waiting(
    api: &BotApi,
    bot: UserId,
    elsewhere_chats: Elsewhere,
) -> Result<Vec<(u64, u64, u64)>, BotError> {
    let chats = bot_chats(api, bot)?;
    let cursors: HashMap<ChatId, u64> = {
        let g = api.group(bot, "bot")?;
        let st = g.shared().read();
        let b = st
            .bots()
            .get(bot)
            .ok_or_else(|| BotError::new(401, "invalid bot token"))?;
        chats
            .iter()
            .filter_map(|c| b.cursor(*c).map(|at| (*c, at)))
            .collect()
    };
    // (chat, head, joined): here, then per group elsewhere.
    let mut heads: Vec<(ChatId, u64, u64)> = Vec::new();
    let mut far: Vec<(GroupId, Vec<ChatId>)> = Vec::new();
    for chat in chats {
        if let Some(g) = elsewhere(api, chat) {
            if elsewhere_chats != Elsewhere::Skip {
                add_by_group(&mut far, g, chat);
            }
            continue;
        }
        let Ok(group) = api.group(chat, "chat") else {
            continue;
        };
        let st = group.shared().read();
        // Only while a member, and never from before the bot joined.
        if let (Some(head), Some(joined)) = (st.head_seq(chat), st.joined_seq(chat, bot)) {
            heads.push((chat, head, joined));
        }
    }
    let barrier = elsewhere_chats == Elsewhere::Linearizable;
    for (g, mut list) in far {
        list.sort_unstable();
        match heads_elsewhere(api, bot, g, &list, barrier).await {
            Ok(got) => heads.extend(got),
            // A group no replica answers for now: its chats wait, the others go on.
            Err(e) => {
                tracing::debug!(bot, group = g, error = %e.description, "bot chats elsewhere")
            }
        }
    }
    let mut out = Vec::new();
    for (chat, head, joined) in heads {
        let cursor = cursors.get(&chat).copied();
        let first = cursor.map_or(joined, |c| (c + 1).max(joined)).max(1);
        if first <= head {
            out.push((chat, first, head));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Whether some chat of the bot lives in a group this node does not serve (its news
/// wakes no local apply: a waiting poll looks again every [`REMOTE_RECHECK`]).
fn has_chats_elsewhere(api: &BotApi, bot: UserId) -> bool {
    bot_chats(api, bot).is_ok_and(|chats| chats.iter().any(|c| elsewhere(api, *c).is_some()))
}

/// Updates of the bot's chats not handed out yet (for `getWebhookInfo`).
pub(crate) async fn not_handed_out(api: &BotApi, bot: UserId) -> Result<u64, BotError> {
    Ok(waiting(api, bot, Elsewhere::Linearizable)
        .await?
        .iter()
        .map(|(_, first, head)| head - first + 1)
        .sum())
}

/// Hands out up to `limit` new updates; false when there is nothing new. Each chat with
/// news gets a fair share of `limit` (at least one), so one busy chat cannot starve the
/// others. `elsewhere`: whether and how chats of groups not served here are looked at
/// (a request per such group).
pub(crate) async fn hand_out(
    api: &BotApi,
    bot: UserId,
    limit: u64,
    elsewhere: Elsewhere,
) -> Result<bool, BotError> {
    let mut news = waiting(api, bot, elsewhere).await?;
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
    let recheck = has_chats_elsewhere(api, bot);
    // Local applies wake the loop often on a busy node: chats elsewhere are looked at
    // on the first pass and then every REMOTE_RECHECK, not on every wake.
    let mut looked_elsewhere: Option<tokio::time::Instant> = None;
    loop {
        applied.borrow_and_update();
        let (pending, confirmed) = pending(api, bot)?;
        if !pending.is_empty() {
            let got = read_pending(api, bot, &pending, offset.max(confirmed), limit).await?;
            if !got.is_empty() {
                return Ok(got);
            }
        } else {
            // The first look is linearizable (a post acknowledged before the call is
            // seen); the rechecks while waiting read heads without a barrier.
            let elsewhere = match looked_elsewhere {
                _ if !recheck => Elsewhere::Skip,
                None => Elsewhere::Linearizable,
                Some(at) if at.elapsed() >= REMOTE_RECHECK => Elsewhere::Applied,
                Some(_) => Elsewhere::Skip,
            };
            if elsewhere != Elsewhere::Skip {
                looked_elsewhere = Some(tokio::time::Instant::now());
            }
            if hand_out(api, bot, limit, elsewhere).await? {
                continue;
            }
        }
        let newer = async {
            match superseded.as_mut() {
                Some(s) => {
                    let _ = s.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(Vec::new());
        }
        let until = if recheck {
            deadline.min(now + REMOTE_RECHECK)
        } else {
            deadline
        };
        tokio::select! {
            _ = tokio::time::timeout_at(until, applied.changed()) => {}
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
