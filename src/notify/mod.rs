//! Push notifications for members who are offline: a bounded, durable outbox on the node
//! and a worker that delivers it to a webhook (where a deployment plugs in APNs or FCM).
//!
//! What it owns: deciding who is notified of new chat events (members of the chat with no
//! online session on this node nor, as the hub last heard, on another node of the cluster
//! (`fanout/online.rs`), other than the event's sender), collapsing notifications
//! per (user, chat) over a window so a busy group yields one notification per window and
//! not one per message, the outbox (an engine log of this node, written durably before
//! anything is delivered), and the delivery loop (POST, retries with backoff, purge after
//! a 2xx). What it must not do: work on the write path (the fan-out watcher calls it after
//! apply, only for the groups this node leads, so a notification is emitted once per
//! cluster), or put message bodies in notifications: a notification says which chat has
//! how many new messages and up to which seq, never what they say (a client fetches them;
//! secret chats in particular must never leak into a push service).
//!
//! Delivery is at least once: a batch is purged from the outbox only after the webhook
//! answered 2xx, so a crash between the answer and the purge sends it again. Each record
//! carries an id (its outbox index) for the receiver to de-duplicate. Pending
//! notifications not yet written to the outbox (at most one collapse window's worth) are
//! lost in a crash; everything in the outbox survives it.
//!
//! The webhook receives `POST` with `Content-Type: application/json` and
//! `{"notifications": [{"id": N, "kind": "chat", "user_id": U, "chat_id": C,
//! "new_messages": K, "last_seq": S, "timestamp_ms": T}, …]}`, at most
//! [`DELIVERY_BATCH_MAX`] per request, and `Authorization: Bearer TOKEN` when configured.
//! A secret-chat message for a device that is not online says only that something
//! arrived, for which device: `{"id": N, "kind": "secret", "user_id": U, "device_id": D,
//! "timestamp_ms": T}` (no sender, no secret chat, no count: nothing of the message).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatlog_raft::chat::{ChatId, EventKind, UserId};
use chatlog_raft::node::{Group, Node};
use chatlog_storage::{Engine, LogId, WriteBatch};
use serde_json::json;
use tokio::sync::Notify;

use crate::http::client::request;

/// Default collapse window: notifications of one (user, chat) within it become one.
pub const COLLAPSE_DEFAULT: Duration = Duration::from_secs(1);
/// Records the outbox holds at most; beyond, new notifications are dropped (counted and
/// logged). Why: a webhook that is down for hours must not fill the disk; at ~60 bytes a
/// record this is ~60 MB.
pub const OUTBOX_RECORDS_MAX: u64 = 1_000_000;
/// (user, chat) pairs waiting in the collapse window at most; beyond, new ones are
/// dropped until the next flush. Why: a post to a channel of millions of offline
/// subscribers must not grow memory without bound (~50 bytes a pair).
pub const PENDING_MAX: usize = 1_000_000;
/// Members examined per page when finding who is offline (a 200,000-member group takes
/// 200 pages, once per collapse window and chat).
const MEMBERS_PAGE: usize = 1_000;
/// Notifications per webhook request.
pub const DELIVERY_BATCH_MAX: usize = 100;
/// Longest one webhook request may take.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed delivery; it doubles up to [`RETRY_BACKOFF_MAX`].
pub const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest wait between two delivery attempts.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where notifications go.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `host:port` of the webhook.
    pub addr: String,
    /// Its path (from `/`).
    pub path: String,
    /// Sent as `Authorization: Bearer TOKEN`, if set.
    pub token: Option<String>,
    /// The collapse window.
    pub collapse: Duration,
}

impl NotifyConfig {
    /// Parses `http://host:port/path` (only plain HTTP: the webhook is a service of the
    /// deployment's own, next to the node).
    pub fn parse(url: &str, token: Option<String>, collapse: Duration) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("push webhook {url:?}: only http:// URLs are supported"))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!("push webhook {url:?}: give host:port"));
        }
        Ok(NotifyConfig {
            addr: addr.into(),
            path: path.into(),
            token,
            collapse,
        })
    }
}

/// One notification waiting in the collapse window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    new_messages: u64,
    last_seq: u64,
    timestamp_ms: u64,
}

/// New events of one chat since the last flush: `(from, head]`.
#[derive(Debug)]
struct Moved {
    group: Group,
    from: u64,
    head: u64,
}

/// A notification waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    /// New messages in a chat.
    Chat {
        user: UserId,
        chat: ChatId,
        pending: Pending,
    },
    /// Something arrived in a secret chat for one device.
    Secret {
        user: UserId,
        device: String,
        timestamp_ms: u64,
    },
}

/// What the notifier has done, for metrics and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NotifyStats {
    /// Notifications written to the outbox.
    pub queued: u64,
    /// Notifications the webhook accepted.
    pub delivered: u64,
    /// Failed delivery attempts.
    pub failed_attempts: u64,
    /// Notifications dropped because a bound was reached.
    pub dropped: u64,
}

/// The notifier of one node.
#[derive(Debug)]
pub struct Notifier {
    node: Arc<Node>,
    config: NotifyConfig,
    pending: Mutex<HashMap<(UserId, ChatId), Pending>>,
    /// Chats with new events since the last flush: at most [`PENDING_MAX`].
    moved: Mutex<HashMap<ChatId, Moved>>,
    /// The hub that knows who is online here (set by `Hub::set_notifier`).
    hub: std::sync::OnceLock<std::sync::Weak<crate::fanout::Hub>>,
    /// Secret-chat arrivals waiting, by (user, device): when.
    pending_secret: Mutex<HashMap<(UserId, String), u64>>,
    stats: Mutex<NotifyStats>,
    /// Woken when records were added to the outbox.
    written: Notify,
}

/// The engine log of this node's outbox.
fn outbox_log() -> LogId {
    chatlog_raft::ids::node_log(chatlog_raft::ids::NODE_LOG_PUSH_OUTBOX)
}

impl Notifier {
    /// Starts the collapse flusher and the delivery worker. Call within a tokio runtime.
    pub fn start(node: Arc<Node>, config: NotifyConfig) -> Arc<Notifier> {
        let notifier = Arc::new(Notifier {
            node,
            config,
            pending: Mutex::new(HashMap::new()),
            moved: Mutex::new(HashMap::new()),
            hub: std::sync::OnceLock::new(),
            pending_secret: Mutex::new(HashMap::new()),
            stats: Mutex::new(NotifyStats::default()),
            written: Notify::new(),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&notifier)));
        tokio::spawn(deliver_loop(Arc::downgrade(&notifier)));
        notifier
    }

    /// What it has done so far.
    pub fn stats(&self) -> NotifyStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engine(&self) -> &Arc<Engine> {
        self.node.engine()
    }

    /// Events `(from, head]` of `chat` were applied in `group`. Only notes the range:
    /// who is offline and how many messages each missed is worked out once per collapse
    /// window in [`Notifier::flush`], not on every applied batch (a post to a group of
    /// 200,000 members must not cost a member scan per entry). Only the group's leader
    /// notifies.
    pub fn chat_moved(&self, group: &Group, chat: ChatId, from: u64, head: u64) {
        if group.leader() != Some(self.node.node_id()) {
            return;
        }
        let mut moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = moved.get_mut(&chat) {
            m.head = m.head.max(head);
        } else if moved.len() < PENDING_MAX {
            moved.insert(
                chat,
                Moved {
                    group: group.clone(),
                    from,
                    head,
                },
            );
        } else {
            drop(moved);
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += 1;
        }
    }

    /// Turns the chats that moved in the window into notifications for every member
    /// without an online session here (`is_online`) who did not send the messages.
    fn collect_moved(&self, is_online: &dyn Fn(UserId) -> bool) {
        let moved: Vec<(ChatId, Moved)> = self
            .moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let now = chatlog_raft::clock::now_ms();
        let mut dropped = 0u64;
        for (chat, m) in moved {
            let st = m.group.shared().read();
            let Some(locs) = st.chat_events(chat, m.from + 1, m.head) else {
                continue;
            };
            let messages: Vec<(u64, UserId)> = locs
                .iter()
                .filter(|(_, l)| l.kind() == EventKind::MessagePosted && !l.erased())
                .map(|(seq, l)| (*seq, l.sender))
                .collect();
            let Some(&(last_seq, _)) = messages.last() else {
                continue;
            };
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut after = 0;
            while let Some((page, more)) = st.members(chat, after, MEMBERS_PAGE) {
                for member in &page {
                    after = member.user;
                    if is_online(member.user) {
                        continue;
                    }
                    let count = messages.iter().filter(|(_, s)| *s != member.user).count() as u64;
                    if count == 0 {
                        continue;
                    }
                    let key = (member.user, chat);
                    if let Some(p) = pending.get_mut(&key) {
                        p.new_messages += count;
                        p.last_seq = last_seq;
                        p.timestamp_ms = now;
                    } else if pending.len() < PENDING_MAX {
                        pending.insert(
                            key,
                            Pending {
                                new_messages: count,
                                last_seq,
                                timestamp_ms: now,
                            },
                        );
                    } else {
                        dropped += 1;
                    }
                }
                if !more {
                    break;
                }
            }
        }
        if dropped > 0 {
            tracing::warn!(dropped, "push notifications dropped: too many pending");
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += dropped;
        }
    }

    /// A secret-chat message arrived in `group` for `(user, device)`, which has no
    /// connection here: notes a notification that says only that (collapsed per device;
    /// which secret chat, from whom and what stay out of it). Only the group's leader
    /// notifies.
    pub fn secret_arrived(&self, group: &Group, user: UserId, device: &str) {
        if group.leader() != Some(self.node.node_id()) {
            return;
        }
        let mut p = self
            .pending_secret
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (user, device.to_string());
        if p.len() >= PENDING_MAX && !p.contains_key(&key) {
            drop(p);
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += 1;
            return;
        }
        p.insert(key, chatlog_raft::clock::now_ms());
    }

    /// Whom the hub at `hub` sees online is not notified (set once, by the hub).
    pub fn set_hub(&self, hub: std::sync::Weak<crate::fanout::Hub>) {
        let _ = self.hub.set(hub);
    }

    /// Writes what collapsed in the window to the outbox, durably.
    async fn flush(&self) -> Result<(), String> {
        let hub = self.hub.get().and_then(std::sync::Weak::upgrade);
        self.collect_moved(&|u| hub.as_ref().is_some_and(|h| h.is_online(u)));
        let pending: Vec<Record> =
            {
                let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let mut s = self
                    .pending_secret
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if p.is_empty() && s.is_empty() {
                    return Ok(());
                }
                let mut chats: Vec<_> = p.drain().collect();
                chats.sort_by_key(|(k, _)| *k);
                let mut secrets: Vec<_> = s.drain().collect();
                secrets.sort_by(|(a, _), (b, _)| a.cmp(b));
                chats
                    .into_iter()
                    .map(|((user, chat), pending)| Record::Chat {
                        user,
                        chat,
                        pending,
                    })
                    .chain(secrets.into_iter().map(|((user, device), timestamp_ms)| {
                        Record::Secret {
                            user,
                            device,
                            timestamp_ms,
                        }
                    }))
                    .collect()
            };
        let log = outbox_log();
        let bounds = self.engine().bounds(log);
        let (first, next) = bounds.map_or((1, 1), |b| (b.first, b.next.max(1)));
        let room = OUTBOX_RECORDS_MAX.saturating_sub(next - first) as usize;
        let take = pending.len().min(room);
        if take < pending.len() {
            let dropped = (pending.len() - take) as u64;
            tracing::warn!(dropped, "push notifications dropped: the outbox is full");
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).dropped += dropped;
        }
        if take == 0 {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for (i, record) in pending.iter().take(take).enumerate() {
            batch.append(log, next + i as u64, &encode_record(record));
        }
        self.engine()
            .write(&batch)
            .await
            .map_err(|e| format!("writing the push outbox: {e}"))?;
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).queued += take as u64;
        self.written.notify_one();
        Ok(())
    }

    /// Delivers the oldest records of the outbox; `Ok(false)` when it is empty.
    async fn deliver_some(&self) -> Result<bool, String> {
        let log = outbox_log();
        let Some(bounds) = self.engine().bounds(log).filter(|b| !b.is_empty()) else {
            return Ok(false);
        };
        let to = bounds.next.min(bounds.first + DELIVERY_BATCH_MAX as u64);
        let records = self
            .engine()
            .read(log, bounds.first..to, usize::MAX)
            .map_err(|e| format!("reading the push outbox: {e}"))?;
        let mut notifications = Vec::with_capacity(records.len());
        for (i, bytes) in records.iter().enumerate() {
            let id = bounds.first + i as u64;
            let record = decode_record(bytes)
                .ok_or_else(|| format!("push outbox record {id} is malformed"))?;
            notifications.push(match record {
                Record::Chat {
                    user,
                    chat,
                    pending: p,
                } => json!({
                    "id": id,
                    "kind": "chat",
                    "user_id": user,
                    "chat_id": chat,
                    "new_messages": p.new_messages,
                    "last_seq": p.last_seq,
                    "timestamp_ms": p.timestamp_ms,
                }),
                Record::Secret {
                    user,
                    device,
                    timestamp_ms,
                } => json!({
                    "id": id,
                    "kind": "secret",
                    "user_id": user,
                    "device_id": device,
                    "timestamp_ms": timestamp_ms,
                }),
            });
        }
        let delivered = notifications.len() as u64;
        let body = serde_json::to_vec(&json!({ "notifications": notifications }))
            .map_err(|e| format!("encoding notifications: {e}"))?;
        let response = request(
            &self.config.addr,
            "POST",
            &self.config.path,
            self.config.token.as_deref(),
            Some(&body),
            DELIVERY_TIMEOUT,
        )
        .await?;
        if !(200..300).contains(&response.status) {
            return Err(format!(
                "the push webhook answered {}: {}",
                response.status,
                response.text().chars().take(200).collect::<String>()
            ));
        }
        let mut purge = WriteBatch::new();
        purge.purge_before(log, bounds.first + delivered);
        self.engine()
            .write(&purge)
            .await
            .map_err(|e| format!("purging the push outbox: {e}"))?;
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delivered += delivered;
        Ok(true)
    }
}

async fn flush_loop(notifier: std::sync::Weak<Notifier>) {
    loop {
        let Some(n) = notifier.upgrade() else { return };
        let window = n.config.collapse;
        if let Err(e) = n.flush().await {
            // The engine stopped (a full disk, a failed sync): nothing more can be queued.
            tracing::error!(error = %e, "push notifications stop");
            return;
        }
        drop(n);
        tokio::time::sleep(window).await;
    }
}

async fn deliver_loop(notifier: std::sync::Weak<Notifier>) {
    let mut backoff = RETRY_BACKOFF_INITIAL;
    loop {
        let Some(n) = notifier.upgrade() else { return };
        match n.deliver_some().await {
            Ok(true) => backoff = RETRY_BACKOFF_INITIAL,
            Ok(false) => {
                // Empty: wait for new records (`notify_one` keeps a wake-up sent before
                // this wait), or look again now and then.
                let _ = tokio::time::timeout(RETRY_BACKOFF_MAX, n.written.notified()).await;
            }
            Err(e) => {
                n.stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failed_attempts += 1;
                tracing::warn!(error = %e, retry_in = ?backoff, "push notification delivery failed");
                drop(n);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
        }
    }
}

/// Record bytes (the engine checksums every record; the first byte names the layout):
/// - 1, a chat record: user, chat, new messages, last seq, timestamp (u64 LE each);
/// - 2, a secret arrival: user, timestamp (u64 LE each), device id length (u8) and
///   bytes.
fn encode_record(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match record {
        Record::Chat {
            user,
            chat,
            pending: p,
        } => {
            out.push(1u8);
            for v in [*user, *chat, p.new_messages, p.last_seq, p.timestamp_ms] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Record::Secret {
            user,
            device,
            timestamp_ms,
        } => {
            out.push(2u8);
            for v in [*user, *timestamp_ms] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            // Device ids are at most 64 bytes (the protocol's limit); cut defensively.
            let d = &device.as_bytes()[..device.len().min(u8::MAX as usize)];
            out.push(d.len() as u8);
            out.extend_from_slice(d);
        }
    }
    out
}

fn decode_record(bytes: &[u8]) -> Option<Record> {
    let u = |i: usize| -> Option<u64> {
        let at = 1 + 8 * i;
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    match *bytes.first()? {
        1 if bytes.len() == 41 => Some(Record::Chat {
            user: u(0)?,
            chat: u(1)?,
            pending: Pending {
                new_messages: u(2)?,
                last_seq: u(3)?,
                timestamp_ms: u(4)?,
            },
        }),
        2 => {
            let len = *bytes.get(17)? as usize;
            if bytes.len() != 18 + len {
                return None;
            }
            Some(Record::Secret {
                user: u(0)?,
                timestamp_ms: u(1)?,
                device: String::from_utf8(bytes[18..].to_vec()).ok()?,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_other_layouts() {
        let chat = Record::Chat {
            user: 3,
            chat: 9,
            pending: Pending {
                new_messages: 7,
                last_seq: 42,
                timestamp_ms: 1_700_000_000_000,
            },
        };
        let secret = Record::Secret {
            user: 5,
            device: "phone".into(),
            timestamp_ms: 1_700_000_000_001,
        };
        for r in [&chat, &secret] {
            let bytes = encode_record(r);
            assert_eq!(decode_record(&bytes).as_ref(), Some(r));
            assert!(
                decode_record(&bytes[..bytes.len() - 1]).is_none(),
                "cut short"
            );
            let mut other = bytes.clone();
            other[0] = 3;
            assert!(decode_record(&other).is_none(), "unknown layout");
        }
    }

    #[test]
    fn webhook_urls_parse() {
        let c = NotifyConfig::parse("http://127.0.0.1:9000/push", None, COLLAPSE_DEFAULT)
            .expect("parses");
        assert_eq!(
            (c.addr.as_str(), c.path.as_str()),
            ("127.0.0.1:9000", "/push")
        );
        let c = NotifyConfig::parse("http://localhost:80", None, COLLAPSE_DEFAULT).expect("ok");
        assert_eq!(c.path, "/");
        assert!(NotifyConfig::parse("https://x:1/", None, COLLAPSE_DEFAULT).is_err());
        assert!(NotifyConfig::parse("http:///p", None, COLLAPSE_DEFAULT).is_err());
    }
}
