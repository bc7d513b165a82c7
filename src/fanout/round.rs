//! One watcher round's chat pushes, with each Raft log entry read once for all chats.
//!
//! What it owns: turning a round's news (`news.rs`: per chat a seq range and its
//! recipients) into `ChatEvents` pushes, reading the events of many chats in one pass
//! over the log. Under load one entry carries the posts of ~40 chats; reading the
//! events chat by chat read (and checksummed, and decoded) that entry once per chat, so
//! the fan-out of a post cost a read of ~40 posts' bytes. Here the events of up to
//! [`FANOUT_ROUND_EVENTS_MAX`] events' worth of chats are sorted by their place in the
//! log and read in one `Group::read_commands` call (runs of consecutive entries, each
//! entry once), then handed back to their chats in seq order.
//!
//! What it must not do: change what is pushed or to whom. Each chat's events still go
//! to its recipients' sessions in seq order, cut into pushes as `Hub::push_chat` cuts
//! them; a chat with more new events than one history page, and any chat of a batch
//! whose read fails, takes `Hub::push_chat`'s path (one chat at a time) instead.

use chatlog_raft::chat::EventLoc;
use chatlog_raft::node::Group;
use chatlog_wire::proto::v1::{self, push};

use super::news::ChatNews;
use super::{FANOUT_READ_EVENTS_MAX, Hub, split_by_bytes};
use crate::gateway::{PushSender, SharedPush};
use crate::service::convert;

/// Most events one batched read of a watcher round covers (the events of several chats
/// together). Why: the events read are held in memory until pushed; ten history pages'
/// worth keeps that to a few MiB at worst (every text at its limit) and covers a round
/// of a busy group in one read (~40 posts per entry, typically one to a few entries per
/// round).
pub const FANOUT_ROUND_EVENTS_MAX: u64 = 10 * FANOUT_READ_EVENTS_MAX;

/// A chat of the batch being gathered: its news and the sessions to push to.
struct Pending<'a> {
    news: &'a ChatNews,
    recipients: Vec<PushSender>,
}

impl Hub {
    /// Pushes the new events of every chat of a watcher round to its recipients'
    /// sessions here (see the module docs).
    pub(super) async fn push_chats(&self, group: &Group, chats: &[ChatNews]) {
        let mut batch: Vec<Pending<'_>> = Vec::new();
        let mut batch_events = 0;
        for news in chats {
            if news.recipients.is_empty() {
                continue;
            }
            let events = news.to + 1 - news.from;
            if events > FANOUT_READ_EVENTS_MAX {
                // A session far behind (or a burst into one chat): page by page.
                self.push_chat(group, news.chat, news.from, news.to, &news.recipients)
                    .await;
                continue;
            }
            let recipients = self.conns_of(&news.recipients);
            if recipients.is_empty() {
                continue;
            }
            if batch_events + events > FANOUT_ROUND_EVENTS_MAX {
                self.push_batch(group, std::mem::take(&mut batch)).await;
                batch_events = 0;
            }
            batch_events += events;
            batch.push(Pending { news, recipients });
        }
        if !batch.is_empty() {
            self.push_batch(group, batch).await;
        }
    }

    /// Reads the events of `batch`'s chats in one pass over the log and pushes them.
    async fn push_batch(&self, group: &Group, batch: Vec<Pending<'_>>) {
        // (seq, loc) of every event, and which chat of the batch it belongs to.
        let mut places: Vec<(usize, u64, EventLoc)> = Vec::new();
        // Events the state names per chat (retention may have dropped the oldest).
        let mut named = Vec::with_capacity(batch.len());
        {
            let st = group.shared().read();
            for (i, p) in batch.iter().enumerate() {
                let locs = st
                    .chat_events(p.news.chat, p.news.from, p.news.to)
                    .unwrap_or_default();
                named.push(locs.len());
                places.extend(locs.into_iter().map(|(seq, loc)| (i, seq, loc)));
            }
        }
        // In log order, so that `read_commands` reads each run of entries once. Within
        // one chat, log order is seq order (apply assigns seqs in log order).
        places.sort_unstable_by_key(|(_, _, loc)| (loc.raft_index(), loc.pos()));
        let locs: Vec<(u64, EventLoc)> = places.iter().map(|(_, seq, loc)| (*seq, *loc)).collect();
        let rows = match group.read_commands(&locs).await {
            Ok(rows) if rows.len() == locs.len() => rows,
            result => {
                if let Err(error) = result {
                    tracing::warn!(%error, "fan-out: a batched read failed; reading chat by chat");
                }
                for p in &batch {
                    self.push_chat(
                        group,
                        p.news.chat,
                        p.news.from,
                        p.news.to,
                        &p.news.recipients,
                    )
                    .await;
                }
                return;
            }
        };
        let mut events: Vec<Vec<v1::Event>> = batch.iter().map(|_| Vec::new()).collect();
        let mut broken = vec![false; batch.len()];
        for ((i, _, _), (seq, loc, cmd, ts)) in places.iter().zip(&rows) {
            match convert::chat_event(batch[*i].news.chat, *seq, loc, cmd, *ts) {
                Some(event) => events[*i].push(event),
                None => broken[*i] = true,
            }
        }
        for (i, (p, mut events)) in batch.iter().zip(events).enumerate() {
            let (chat, from, to) = (p.news.chat, p.news.from, p.news.to);
            if broken[i] || events.len() != named[i] {
                // Sessions see the gap in seqs at their next push and sync.
                tracing::error!(chat, from, to, "fan-out could not read events");
                continue;
            }
            // Already in seq order (see above); a pair check costs one pass.
            if !events.is_sorted_by_key(|e| e.seq) {
                events.sort_by_key(|e| e.seq);
            }
            if events.is_empty() {
                continue;
            }
            push_to(chat, events, &p.recipients);
        }
    }
}

/// Pushes one chat's consecutive `events` to `recipients`, cut into frames as
/// `Hub::push_chat` cuts them, each encoded once and shared by every recipient.
fn push_to(chat: u64, events: Vec<v1::Event>, recipients: &[PushSender]) {
    for batch in split_by_bytes(events) {
        let Some(frame) = SharedPush::new(push::Kind::ChatEvents(v1::ChatEvents { events: batch }))
        else {
            tracing::error!(chat, "fan-out push over the frame limit");
            return;
        };
        for r in recipients {
            // A full queue disconnects that session only (slow reader).
            let _ = r.push_shared(&frame);
        }
    }
}
