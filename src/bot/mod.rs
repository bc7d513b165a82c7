//! The HTTP bot API (issue 11): Telegram-style `/bot{TOKEN}/{method}` on the node's HTTP
//! port, long polling with durable update ids, and webhooks. `docs/bots.md` is the user
//! guide; `openapi.json` (served at `/bot/openapi.json`) describes every method.
//!
//! What it owns: bot tokens (format, hashing, checking on every call), the API's methods
//! and their JSON, turning them into chat commands proposed as the bot (so a bot obeys
//! exactly the permissions of a user, checked by the state machine, and the same per-user
//! send rate, `--user-sends-per-sec`), handing out updates (`updates.rs`) and delivering
//! them to webhooks (`webhook.rs`), and the `create_bot` / `list_bots` /
//! `reset_bot_token` requests of the binary protocol (`account.rs`).
//! What it must not do: decide chat rules (the state machine does), keep update ids in
//! memory (they live in the bot's group, `chatlog_raft::chat::bot`), or copy events: they
//! are read from the chats' logs each time they are delivered.
//!
//! Tokens. A bot token is `"{user_id}:{64 hex digits}"` (like Telegram's
//! `"123:ABC…"`): the user id names the group holding the bot, and only the SHA-256 of
//! the secret part enters the log, as the bot user's one session.
//!
//! Any node answers a bot call: one that serves no replica of the bot's group (or of the
//! group of the call's `chat_id`, when another node serves both) sends the whole call to
//! a node that does and answers what that node answered (`forward.rs`).
//!
//! Updates are handed out by a replica of the bot's group; a chat of the bot in a group
//! that node does not serve is read from a replica of that group (`updates.rs`).
//!
//! Long polls of one bot supersede each other on the node that answers them, which is
//! the leader of the bot's group wherever they are made (`forward::answered_at_leader`);
//! only while a replica cannot reach the leader does it answer a poll itself. Webhook
//! delivery runs on the leader of the bot's group and is never forwarded.

pub mod account;
pub mod cli;
pub mod forward;
pub mod methods;
pub mod updates;
pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatlog_raft::chat::command::TokenHash;
use chatlog_raft::chat::{ChatId, Command, MediaRef, Outcome, UserId, group_of};
use chatlog_raft::node::{Group, Node};
use chatlog_wire::proto::v1::{self, ErrorCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::service::convert::{propose_error, refusal};
use crate::service::ratelimit::{Limiter, RateLimits};

/// Largest request body of a bot call, in bytes. Why: the largest parameter is a message
/// text of `TEXT_BYTES_MAX` (16 KiB) UTF-8 bytes, which JSON escaping can grow up to six
/// times (`\uXXXX`); 128 KiB holds that with room for the other fields.
pub const REQUEST_BODY_BYTES_MAX: usize = 128 * 1024;
/// Longest `getUpdates` long poll, in seconds. Why: Telegram's clients commonly use 30 to
/// 50 s; a bound keeps a forgotten poll from holding a task and the bot's poll slot, and
/// stays under common proxy idle timeouts (60 s).
pub const LONG_POLL_TIMEOUT_S_MAX: u64 = 50;
/// Longest a bot call answered on this node takes before answering 503: the longest
/// long poll plus the time to commit its hand-out and read the events. A call answered
/// by another node is bounded there by the same, and here by `forward::FORWARD_TIMEOUT`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(LONG_POLL_TIMEOUT_S_MAX + 10);
/// Most updates one `getUpdates` returns (Telegram's limit too), and its default.
pub const UPDATES_LIMIT_MAX: u64 = chatlog_raft::chat::bot::HANDOUT_UPDATES_MAX;
/// Longest idempotency key accepted (`idempotency_key` or the `Idempotency-Key` header).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Bots with a long-poll slot remembered per node; beyond, idle slots are forgotten
/// first (a slot is small and re-created on the next poll).
pub const POLL_SLOTS_MAX: usize = 1 << 16;
/// Longest a `getUpdates` waits for the poll it supersedes to finish answering (it is
/// told at once; this only bounds a slow read of its events).
pub const POLL_TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// One bot's long-poll slot: one poll at a time; a new poll supersedes the running one,
/// which answers 409 (as Telegram's "terminated by other getUpdates request"), so a
/// client that gave up on a poll is never locked out by it.
#[derive(Debug)]
struct PollSlot {
    lock: tokio::sync::Mutex<()>,
    /// Bumped by every new poll; a poll whose number is no longer current stops.
    generation: watch::Sender<u64>,
}

impl Default for PollSlot {
    fn default() -> Self {
        PollSlot {
            lock: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
        }
    }
}

/// The error of a superseded poll.
pub(crate) fn superseded() -> BotError {
    BotError::new(
        409,
        "terminated by other getUpdates request; make sure that only one bot instance is          running",
    )
}

/// The methods this API implements, as their names are spelled in URLs (matched without
/// regard to case, like Telegram's). The OpenAPI document describes each one.
pub const METHODS: [&str; 9] = [
    "getMe",
    "getUpdates",
    "sendMessage",
    "editMessage",
    "deleteMessage",
    "sendMedia",
    "setWebhook",
    "deleteWebhook",
    "getWebhookInfo",
];

/// The OpenAPI 3 document served at `/bot/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// A failed call: `{"ok": false, "error_code": status, "description": …}` and, for 429,
/// `"parameters": {"retry_after": seconds}` plus a `Retry-After` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotError {
    /// The HTTP status, also the body's `error_code`.
    pub status: u16,
    /// For people.
    pub description: String,
    /// Seconds after which a retry fits (429 only).
    pub retry_after_s: Option<u64>,
}

impl BotError {
    /// An error with `status` and a description prefixed the way Telegram does.
    pub fn new(status: u16, description: impl Into<String>) -> BotError {
        let prefix = match status {
            400 => "Bad Request: ",
            401 => "Unauthorized: ",
            403 => "Forbidden: ",
            404 => "Not Found: ",
            409 => "Conflict: ",
            413 => "Request Entity Too Large: ",
            429 => "Too Many Requests: ",
            _ => "",
        };
        BotError {
            status,
            description: format!("{prefix}{}", description.into()),
            retry_after_s: None,
        }
    }

    /// 400.
    pub fn bad(description: impl Into<String>) -> BotError {
        BotError::new(400, description)
    }

    /// 429 with a retry-after of at least one second (Telegram's unit).
    pub fn rate_limited(what: &str, after: Duration) -> BotError {
        let mut e = BotError::new(429, format!("too many {what}; retry later"));
        e.retry_after_s = Some(after.as_secs_f64().ceil().max(1.0) as u64);
        e
    }

    /// The JSON body.
    pub fn to_json(&self) -> Value {
        let mut v =
            json!({"ok": false, "error_code": self.status, "description": self.description});
        if let Some(s) = self.retry_after_s {
            v["parameters"] = json!({"retry_after": s});
        }
        v
    }
}

impl From<v1::Error> for BotError {
    fn from(e: v1::Error) -> BotError {
        let status = match ErrorCode::try_from(e.code) {
            Ok(ErrorCode::BadRequest) | Ok(ErrorCode::NotFound) => 400,
            Ok(ErrorCode::TooLarge) => 400,
            Ok(ErrorCode::Unauthenticated) => 401,
            Ok(ErrorCode::PermissionDenied) => 403,
            Ok(ErrorCode::Conflict) => 409,
            Ok(ErrorCode::RateLimited) => 429,
            Ok(ErrorCode::Unavailable) | Ok(ErrorCode::Timeout) => 503,
            _ => 500,
        };
        let mut out = BotError::new(status, e.message);
        if status == 429 || (status == 503 && e.retry_after_ms > 0) {
            out.retry_after_s = Some(e.retry_after_ms.div_ceil(1000).max(1));
        }
        out
    }
}

/// What a bot call's parameters are: the query string, a JSON object or a form body,
/// merged (the body wins). Values are JSON (strings from a query or form).
pub type Params = serde_json::Map<String, Value>;

/// What [`MediaResolver::resolve_media`] returns.
pub type MediaFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<MediaRef, BotError>> + Send + 'a>>;

/// Resolves a media id (hex SHA-256 of an uploaded file) into a reference `user` may
/// send: `chatlog serve` wires in the node's chat service (`crate::service::MediaLink`,
/// which asks other nodes when this one cannot say);
/// [`NoMedia`] (for a bot API without media) answers "media not found".
pub trait MediaResolver: Send + Sync + std::fmt::Debug + 'static {
    /// The file named `media_id`, or why not.
    fn resolve_media<'a>(&'a self, user: UserId, media_id: &'a str) -> MediaFuture<'a>;
}

/// A resolver without media: every id is unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMedia;

impl MediaResolver for NoMedia {
    fn resolve_media<'a>(&'a self, _user: UserId, media_id: &'a str) -> MediaFuture<'a> {
        Box::pin(async move { Err(BotError::bad(format!("media not found: {media_id}"))) })
    }
}

/// A webhook's delivery state as `getWebhookInfo` reports it (kept by the node that
/// runs the bot's delivery loop).
#[derive(Debug, Clone, Default)]
pub(crate) struct WebhookStatus {
    pub last_error_date: Option<u64>,
    pub last_error_message: Option<String>,
}

/// The bot API of one node.
#[derive(Debug)]
pub struct BotApi {
    node: Arc<Node>,
    groups: u64,
    limiter: Limiter,
    media: Arc<dyn MediaResolver>,
    /// Bumped after any local group applied something: long polls and webhook loops
    /// wait on it (the "tiny notification hook": one forwarding task per group).
    applied: watch::Receiver<u64>,
    /// One long poll at a time per bot; a new one supersedes the running one.
    polls: Mutex<HashMap<UserId, Arc<PollSlot>>>,
    pub(crate) webhook_status: Mutex<HashMap<UserId, WebhookStatus>>,
    /// Whether each sender of an update whose group this node does not serve is a bot
    /// (`updates.rs`): asked once (a user never becomes a bot or stops being one),
    /// at most [`SENDER_KINDS_MAX`] remembered.
    sender_kinds: Mutex<HashMap<UserId, bool>>,
}

/// Senders remembered as bots or people (`BotApi::sender_kinds`); beyond, all are
/// forgotten and asked again. Why: an entry is ~16 bytes, so 1 MiB at most.
pub const SENDER_KINDS_MAX: usize = 1 << 16;

/// The SHA-256 of a token's secret part: what the log keeps.
pub(crate) fn hash_secret(secret: &str) -> TokenHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new token's secret part: 32 random bytes in hex.
pub(crate) fn new_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BotApi {
    /// The bot API over a started node, with the node's rate limits; starts the applied
    /// notifications and the webhook supervisor (call within a tokio runtime).
    pub fn start(node: Arc<Node>, limits: RateLimits) -> Arc<BotApi> {
        BotApi::start_with_media(node, limits, Arc::new(NoMedia))
    }

    /// [`BotApi::start`] with a media resolver (`chatlog serve` passes the node's).
    pub fn start_with_media(
        node: Arc<Node>,
        limits: RateLimits,
        media: Arc<dyn MediaResolver>,
    ) -> Arc<BotApi> {
        let (bump, applied) = watch::channel(0u64);
        let bump = Arc::new(bump);
        for g in node.groups() {
            let mut rx = g.shared().applied();
            let bump = Arc::clone(&bump);
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    bump.send_modify(|n| *n = n.wrapping_add(1));
                }
            });
        }
        let api = Arc::new(BotApi {
            groups: node.config().groups,
            node,
            limiter: Limiter::new(limits),
            media,
            applied,
            polls: Mutex::new(HashMap::new()),
            webhook_status: Mutex::new(HashMap::new()),
            sender_kinds: Mutex::new(HashMap::new()),
        });
        webhook::start_supervisor(Arc::downgrade(&api));
        api
    }

    /// The node behind the API.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Checks that `id` can name a user or chat of this cluster (400 if not).
    pub(crate) fn check_id(&self, id: u64, what: &str) -> Result<(), BotError> {
        let g = group_of(id);
        if id == 0 || g == 0 || g > self.groups {
            return Err(BotError::bad(format!("{what} not found: {id}")));
        }
        Ok(())
    }

    /// The local replica of the group of `id` if it may answer reads (a voter of the
    /// placement, not repairing: `Node::serving_group`), or 503 saying why not, or 400.
    pub(crate) fn group(&self, id: u64, what: &str) -> Result<Group, BotError> {
        self.check_id(id, what)?;
        let g = group_of(id);
        if let Some(group) = self.node.serving_group(g) {
            return Ok(group);
        }
        let damage = self
            .node
            .group(g)
            .and_then(|local| local.repair_status().damage());
        let description = match damage {
            // Issue 9: a repairing replica cannot tell what its log holds.
            Some(damage) => {
                format!("{what} {id}: this node's replica of group {g} is repairing: {damage}")
            }
            None => {
                let hosts: Vec<String> = self
                    .node
                    .replicas_of(g)
                    .iter()
                    .map(|n| n.to_string())
                    .collect();
                format!(
                    "{what} {id} lives in group {g}, which this node does not serve; nodes {} do",
                    hosts.join(", ")
                )
            }
        };
        let mut e = BotError::new(503, description);
        e.retry_after_s = Some(1);
        Err(e)
    }

    /// Checks a token; returns the bot's user id.
    pub(crate) fn authenticate(&self, token: &str) -> Result<UserId, BotError> {
        let unauthorized = || BotError::new(401, "invalid bot token");
        let (id, secret) = token.split_once(':').ok_or_else(unauthorized)?;
        let bot: UserId = id.parse().map_err(|_| unauthorized())?;
        let g = group_of(bot);
        if bot == 0 || g == 0 || g > self.groups {
            return Err(unauthorized());
        }
        let group = self.group(bot, "bot")?;
        let st = group.shared().read();
        if st.bots().get(bot).is_none() || st.session_by_token(bot, &hash_secret(secret)).is_none()
        {
            return Err(unauthorized());
        }
        Ok(bot)
    }

    /// Proposes `cmd` in the group of `id` (forwarded to its leader when needed).
    pub(crate) async fn propose(&self, id: u64, cmd: Command) -> Result<Outcome, BotError> {
        let g = group_of(id);
        match self.node.propose(g, cmd).await.map_err(propose_error)? {
            Outcome::Refused(r) => Err(refusal(r).into()),
            o => Ok(o),
        }
    }

    /// Takes one send token of `bot` (the per-user send rate).
    pub(crate) fn take_send(&self, bot: UserId) -> Result<(), BotError> {
        self.limiter
            .user_send(bot)
            .map_err(|after| BotError::rate_limited("messages from this bot", after))
    }

    /// The bot's long-poll slot.
    fn poll_slot(&self, bot: UserId) -> Arc<PollSlot> {
        let mut polls = lock(&self.polls);
        if polls.len() >= POLL_SLOTS_MAX && !polls.contains_key(&bot) {
            polls.retain(|_, m| Arc::strong_count(m) > 1);
        }
        Arc::clone(polls.entry(bot).or_default())
    }

    /// A wake-up source for waiting until something new was applied.
    pub(crate) fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Answers one call: `token` from the path, `method` as named there; on this node,
    /// or on one that serves the groups it needs (`forward.rs`).
    pub async fn call(
        &self,
        token: &str,
        method: &str,
        params: &Params,
        idempotency_header: Option<&str>,
    ) -> Result<Value, BotError> {
        match self.route(token, params) {
            forward::Route::Here => {
                if let Some(answered) = self.at_leader_elsewhere(token, method, params).await {
                    return answered;
                }
                self.call_here(token, method, params, idempotency_header)
                    .await
            }
            forward::Route::Elsewhere { bot_group, needed } => {
                self.forward(
                    bot_group,
                    &needed,
                    token,
                    method,
                    params,
                    idempotency_header,
                )
                .await
            }
        }
    }

    /// Answers one call on this node (never forwarded), within [`CALL_TIMEOUT`].
    pub(crate) async fn call_here(
        &self,
        token: &str,
        method: &str,
        params: &Params,
        idempotency_header: Option<&str>,
    ) -> Result<Value, BotError> {
        let answered = tokio::time::timeout(
            CALL_TIMEOUT,
            self.dispatch(token, method, params, idempotency_header),
        )
        .await;
        answered.unwrap_or_else(|_| {
            Err(BotError::new(
                503,
                format!("no answer within {CALL_TIMEOUT:?}"),
            ))
        })
    }

    async fn dispatch(
        &self,
        token: &str,
        method: &str,
        params: &Params,
        idempotency_header: Option<&str>,
    ) -> Result<Value, BotError> {
        let bot = self.authenticate(token)?;
        let Some(canonical) = METHODS.iter().find(|m| m.eq_ignore_ascii_case(method)) else {
            // `editMessageText` is Telegram's name for editMessage: accept it too.
            if method.eq_ignore_ascii_case("editMessageText") {
                return methods::edit_message(self, bot, params).await;
            }
            return Err(BotError::new(
                404,
                format!("method {method:?} does not exist"),
            ));
        };
        match *canonical {
            "getMe" => methods::get_me(self, bot),
            "getUpdates" => {
                let slot = self.poll_slot(bot);
                let mut generation = slot.generation.subscribe();
                slot.generation.send_modify(|g| *g = g.wrapping_add(1));
                let mine = *generation.borrow_and_update();
                let Ok(_held) = tokio::time::timeout(POLL_TAKEOVER_WAIT, slot.lock.lock()).await
                else {
                    return Err(superseded());
                };
                if *generation.borrow() != mine {
                    return Err(superseded());
                }
                updates::get_updates(self, bot, params, Some(generation)).await
            }
            "sendMessage" => methods::send_message(self, bot, params, idempotency_header).await,
            "editMessage" => methods::edit_message(self, bot, params).await,
            "deleteMessage" => methods::delete_message(self, bot, params).await,
            "sendMedia" => methods::send_media(self, bot, params, idempotency_header).await,
            "setWebhook" => methods::set_webhook(self, bot, params).await,
            "deleteWebhook" => methods::delete_webhook(self, bot, params).await,
            "getWebhookInfo" => methods::get_webhook_info(self, bot).await,
            other => Err(BotError::new(
                404,
                format!("method {other:?} does not exist"),
            )),
        }
    }
}

/// The chats `bot` is in, from its own log (kept by the membership requests).
pub(crate) fn bot_chats(api: &BotApi, bot: UserId) -> Result<Vec<ChatId>, BotError> {
    let g = api.group(bot, "bot")?;
    Ok(g.shared().read().user_chats(bot, 0, usize::MAX).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_telegram_shape() {
        let e = BotError::rate_limited("sends", Duration::from_millis(1200));
        assert_eq!(e.status, 429);
        let v = e.to_json();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error_code"], 429);
        assert_eq!(v["parameters"]["retry_after"], 2);
        let e: BotError = v1::Error::new(ErrorCode::PermissionDenied, "not a member").into();
        assert_eq!(e.status, 403);
        assert_eq!(e.description, "Forbidden: not a member");
    }

    #[test]
    fn the_openapi_document_parses() {
        let v: Value = serde_json::from_str(OPENAPI_JSON).expect("OpenAPI JSON parses");
        assert_eq!(v["openapi"].as_str().map(|s| &s[..2]), Some("3."));
    }
}
