//! The Raft-backed service behind the gateway: what each client request means.
//!
//! What it owns: validating request fields against the protocol's limits, sessions
//! (token format, hashing, checking on every request), routing a request to the group
//! that owns its chat or user (ids carry their group), turning requests into chat
//! commands and outcomes into responses, linearizable history reads rebuilt from the
//! Raft log, read markers and unread counts, live subscriptions, and the relay of
//! secret chats (`secret.rs`). What it must not
//! do: frame bytes or manage connections (the gateway does), or decide chat rules (the
//! state machine in `chatlog-raft` does, identically on every replica).
//!
//! Tokens. A login token is 32 random bytes in hex; a session token is
//! `"{user_id}.{64 hex digits}"`, so the user (and with it the group holding the
//! session) is known before any lookup. Only SHA-256 hashes of tokens enter the log.
//!
//! Cross-group effects (a user's list of chats lives in the user's group, the chat in
//! its own) travel through the chat group's chat-list outbox, recorded in the same apply
//! as the membership change and delivered exactly once, in order, by the group's leader
//! (`chatlog_raft::chat::chat_lists`, `chatlog_raft::chat_list_drain`). A request that
//! changes members waits a bounded time for that delivery, so the caller's next read of
//! its chat list sees the change.

pub mod convert;
pub mod forward;
mod media_forward;

pub use media_forward::MediaLink;
pub mod ratelimit;
pub mod secret;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatlog_raft::GroupId;
use chatlog_raft::chat::command::TokenHash;
use chatlog_raft::chat::{
    self, ChatId, ChatKind, Command, EventKind, EventLoc, Outcome, UserId, group_of, group_of_name,
};
use chatlog_raft::node::{Group, Node};
use chatlog_wire::limits::{
    DEVICE_ID_BYTES_MAX, PAGE_ITEMS_MAX, REACTION_BYTES_MAX, TEXT_BYTES_MAX, TITLE_BYTES_MAX,
};
use chatlog_wire::proto::v1::{self, ErrorCode, request::Kind as Req, response::Kind as Resp};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::fanout::Hub;
use crate::gateway::{ConnCtx, Principal, Service};
use convert::{bad, error, propose_error, refusal};

/// Events per `ChatEvents` push of a subscription.
pub const SUBSCRIPTION_PUSH_EVENTS_MAX: usize = 100;
/// Bytes of events per history page or push, kept under the client frame limit with
/// room for the envelope.
pub const PAGE_BYTES_MAX: usize = 768 * 1024;

/// Longest a membership change waits for the members' chat lists to follow (see
/// `ChatService::await_chat_lists`). Why: delivery is two proposals (typically a few
/// milliseconds); a destination group without a leader would otherwise hold the request
/// for an election or more, though the change itself is already committed.
pub const CHAT_LIST_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The chat service of one node.
#[derive(Debug)]
pub struct ChatService {
    node: Arc<Node>,
    /// Group and channel chats created on this node so far: a new one goes to the next
    /// group round-robin, so groups added later (`admin group add`) get new chats.
    chats_created: std::sync::atomic::AtomicU64,
    dev_mode: bool,
    /// Live subscriptions: (connection id, subscribe request id) → its task.
    subscriptions: Mutex<HashMap<(u64, u64), tokio::task::AbortHandle>>,
    /// Live delivery to every authenticated connection of this node.
    hub: Arc<Hub>,
    /// Token buckets per user (sends) and per connection (requests).
    limiter: ratelimit::Limiter,
    /// Media uploads, downloads and the read rule (`crate::media`).
    media: Arc<crate::media::Media>,
    /// Reads of media other nodes granted lately (`media_forward.rs`).
    media_grants: media_forward::Grants,
}

fn rate_limited(what: &str, retry_after: std::time::Duration) -> v1::Error {
    let mut e = error(
        ErrorCode::RateLimited,
        format!("too many {what}; retry later"),
    );
    e.retry_after_ms = (retry_after.as_millis() as u64).max(1);
    e
}

/// One chat of a sync: the device's position in it and the user's read marker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SyncAsk {
    pub(crate) chat: ChatId,
    pub(crate) last: u64,
    pub(crate) read_seq: u64,
}

/// Adds `item` to the list of its group `g` in `by_group` (groups in the order of their
/// first item): how requests spanning groups gather what to ask each group's replicas.
pub(crate) fn add_by_group<T>(by_group: &mut Vec<(GroupId, Vec<T>)>, g: GroupId, item: T) {
    match by_group.iter_mut().find(|(h, _)| *h == g) {
        Some((_, items)) => items.push(item),
        None => by_group.push((g, vec![item])),
    }
}

/// Messages by others in `(after, head]` of a chat, from a local replica of its group.
pub(crate) fn unread_count(group: &Group, chat: ChatId, user: UserId, after: u64) -> u64 {
    let state = group.shared().read();
    state.chat_events(chat, after + 1, u64::MAX).map_or(0, |v| {
        v.iter()
            .filter(|(_, l)| l.kind() == EventKind::MessagePosted && l.sender != user)
            .count() as u64
    })
}

/// A chat as `user` sees it, when this node hosts the chat's and the user's groups and
/// the user is a member.
pub(crate) fn chat_summary(node: &Node, chat: ChatId, user: UserId) -> Option<v1::ChatSummary> {
    let group = node.serving_group(group_of(chat))?;
    let read_seq = node
        .serving_group(group_of(user))
        .map_or(0, |g| g.shared().read().read_marker(user, chat));
    let (view, role) = {
        let st = group.shared().read();
        (st.chat(chat)?, st.role(chat, user)?)
    };
    Some(v1::ChatSummary {
        chat_id: chat,
        kind: convert::kind_to_proto(view.kind),
        title: view.title,
        role: convert::role_to_proto(role),
        head_seq: view.head_seq,
        read_seq,
        unread_count: unread_count(&group, chat, user, read_seq),
        member_count: view.member_count,
    })
}

fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unauthenticated() -> v1::Error {
    error(
        ErrorCode::Unauthenticated,
        "this request needs a session: log in first",
    )
}

fn check_len(what: &str, s: &str, max: u32) -> Result<(), v1::Error> {
    if s.len() > max as usize {
        return Err(error(
            ErrorCode::TooLarge,
            format!("{what} is {} bytes, over the limit of {max}", s.len()),
        ));
    }
    Ok(())
}

fn check_limit(limit: u32) -> Result<usize, v1::Error> {
    if limit == 0 || limit > PAGE_ITEMS_MAX {
        return Err(bad(format!("limit {limit} is not 1 to {PAGE_ITEMS_MAX}")));
    }
    Ok(limit as usize)
}

impl ChatService {
    /// A service over a started node. `dev_mode` returns login tokens from user
    /// creation and lets anonymous connections create users. Starts the node's fan-out
    /// hub, so call it within a tokio runtime.
    pub fn new(node: Arc<Node>, dev_mode: bool) -> ChatService {
        ChatService::with_limits(node, dev_mode, ratelimit::RateLimits::default())
    }

    /// [`ChatService::new`] with rate limits other than the defaults (0 turns one off).
    pub fn with_limits(
        node: Arc<Node>,
        dev_mode: bool,
        limits: ratelimit::RateLimits,
    ) -> ChatService {
        ChatService::with_media(node, dev_mode, limits, Default::default())
    }

    /// [`ChatService::with_limits`] with a media store configuration other than the
    /// defaults (upload expiry, upload limits).
    pub fn with_media(
        node: Arc<Node>,
        dev_mode: bool,
        limits: ratelimit::RateLimits,
        media: crate::media::store::StoreConfig,
    ) -> ChatService {
        let media = crate::media::Media::start(Arc::clone(&node), media);
        let hub = Hub::start(Arc::clone(&node));
        // Delivers each local group's chat-list outbox while this node leads the group.
        chatlog_raft::chat_list_drain::spawn(&node);
        ChatService {
            node,
            chats_created: std::sync::atomic::AtomicU64::new(0),
            dev_mode,
            subscriptions: Mutex::new(HashMap::new()),
            hub,
            limiter: ratelimit::Limiter::new(limits),
            media,
            media_grants: Default::default(),
        }
    }

    /// The node's media side.
    pub fn media(&self) -> &Arc<crate::media::Media> {
        &self.media
    }

    /// The reference to send media `media_id_hex` (its 64 hex digits) in a message, when
    /// the file is stored and `user` may use it (its uploader, or a member of a chat it
    /// was sent to), on this node or another (`media_forward.rs`). For features that send
    /// media by id, such as bots.
    pub async fn media_ref(
        &self,
        user: UserId,
        media_id_hex: &str,
    ) -> Result<v1::MediaRef, v1::Error> {
        let sha256 = chatlog_wire::client::parse_media_id(media_id_hex).ok_or_else(|| {
            bad(format!(
                "{media_id_hex:?} is not a media id (64 hex digits)"
            ))
        })?;
        self.media_ref_anywhere(user, &sha256).await
    }

    /// The node's fan-out hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The node behind the service.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The group owning id `id` (a user or chat id), wherever it is hosted.
    fn group_id_for(&self, id: u64, what: &str) -> Result<GroupId, v1::Error> {
        let g = group_of(id);
        // Groups can be added while the node runs (`admin group add`): ask the placement.
        if id == 0 || g == 0 || g > self.node.chat_groups() {
            return Err(error(ErrorCode::NotFound, format!("no {what} {id}")));
        }
        Ok(g)
    }

    /// Issue 9: `UNAVAILABLE` when this node's replica of group `g` is repairing a damaged
    /// log (it serves no reads until the leader sent back what it lost).
    fn repairing(&self, g: GroupId, id: u64, what: &str) -> Option<v1::Error> {
        let damage = self.node.group(g)?.repair_status().damage()?;
        let mut e = error(
            ErrorCode::Unavailable,
            format!("{what} {id}: this node's replica of group {g} is repairing: {damage}"),
        );
        e.retry_after_ms = convert::NO_LEADER_RETRY_AFTER_MS;
        Some(e)
    }

    /// The local replica of the group owning id `id` (a user or chat id), for reads.
    /// Writes go through [`ChatService::propose`], which forwards to the group's leader
    /// on any node; reads need a local replica: a node without one forwards the
    /// request to a node with one (`forward.rs`), and answers `UNAVAILABLE` naming the
    /// nodes that host it for what cannot be forwarded.
    fn group_for(&self, id: u64, what: &str) -> Result<Group, v1::Error> {
        let g = self.group_id_for(id, what)?;
        // The serving replica first (one lookup on every request); a repairing replica
        // is never serving, so `repairing` still explains a refusal below.
        if let Some(group) = self.node.serving_group(g) {
            return Ok(group);
        }
        Err(self.unserved(g, id, what))
    }

    /// Why `what` `id` of group `g`, which has no serving replica here, cannot be read
    /// here: this node's replica is repairing (issue 9), or there is none.
    fn unserved(&self, g: GroupId, id: u64, what: &str) -> v1::Error {
        self.repairing(g, id, what)
            .unwrap_or_else(|| self.not_served(g, &format!("{what} {id}")))
    }

    /// `UNAVAILABLE` for `subject` of group `g`, which this node serves no replica of:
    /// naming the nodes that do (connect there; most requests are forwarded instead:
    /// `forward.rs`).
    fn not_served(&self, g: GroupId, subject: &str) -> v1::Error {
        let hosts: Vec<String> = self
            .node
            .replicas_of(g)
            .iter()
            .map(|n| n.to_string())
            .collect();
        convert::unavailable_retry(format!(
            "{subject} lives in group {g}, which this node does not host; nodes {} do",
            hosts.join(", ")
        ))
    }

    /// Proposes `cmd` in group `g` from this node: locally when this node leads the
    /// group, otherwise forwarded to the leader (`Node::propose`).
    async fn propose(&self, g: GroupId, cmd: Command) -> Result<Outcome, v1::Error> {
        // s6gateway: the local leader's path first, with a small future and no copy of
        // the command; the forwarding path's future (several KiB) is boxed, so that a
        // post polled inline on its connection's task stays small (the gateway moves it
        // into its `FuturesUnordered`, once per post).
        let proposed = match self.node.propose_local(g, &cmd).await {
            Some(proposed) => proposed,
            None => Box::pin(self.node.propose(g, cmd)).await,
        };
        match proposed.map_err(propose_error)? {
            Outcome::Refused(r) => Err(refusal(r)),
            o => Ok(o),
        }
    }

    /// Refuses with `NOT_FOUND` a user id that no user has, where this node holds a
    /// replica of the user's group (asking the group's leader before refusing, so a user
    /// created a moment ago counts). On a node without one the check is left to nobody:
    /// the chat group cannot see other groups' users (a known limit, see the notes).
    async fn check_user_exists(&self, user: UserId) -> Result<(), v1::Error> {
        let g = self.group_id_for(user, "user")?;
        match self.node.group(g) {
            Some(group) if !self.user_known(&group, user).await? => {
                Err(error(ErrorCode::NotFound, format!("no user {user}")))
            }
            _ => Ok(()),
        }
    }

    /// Whether `user` exists in `group` (a local replica of the user's group). This
    /// replica may not have applied the user's creation yet (a follower applies a
    /// heartbeat after the leader): before saying no, it catches up with the leader.
    async fn user_known(&self, group: &Group, user: UserId) -> Result<bool, v1::Error> {
        let known = || group.shared().read().user(user).is_some();
        if known() {
            return Ok(true);
        }
        self.node
            .read_barrier(group.id())
            .await
            .map_err(propose_error)?;
        Ok(known())
    }

    /// Waits, at most [`CHAT_LIST_WAIT_MAX`], until the chat-list changes that group
    /// `g` recorded so far are delivered to the members' own groups (the outbox of
    /// `chatlog_raft::chat::chat_lists`), so that the caller's next `ListChats` or `sync`
    /// shows them. Only where this node holds a replica of `g` (it then applied the
    /// change before the proposal returned); elsewhere the lists follow shortly. A
    /// timeout is no error: the records stay in the outbox until delivered.
    async fn await_chat_lists(&self, g: GroupId) {
        let Some(group) = self.node.group(g) else {
            return;
        };
        let target = group.shared().read().chat_lists().next_no();
        let mut applied = group.shared().applied();
        let wait = async {
            while group.shared().read().chat_lists().acked() < target {
                if applied.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(CHAT_LIST_WAIT_MAX, wait)
            .await
            .is_err()
        {
            tracing::debug!(group = g, target, "chat lists not delivered yet");
        }
    }

    /// Registers `conn`, authenticated as `principal`, for live fan-out (after a login
    /// or a token handshake). A connection without live pushes is left out of the
    /// registry: nothing is pushed to it unasked, and it does not make its user online.
    fn register_live(&self, principal: &Principal, conn: &ConnCtx) {
        if conn.live_pushes() {
            self.hub
                .register(principal, conn.connection_id(), conn.pushes().clone());
        }
    }

    /// Who sends `conn`'s requests, and whether this node checked the session: `false`
    /// when it serves no replica of the caller's user group but another node does (the
    /// request is then forwarded there, which checks the session: `forward.rs`).
    async fn caller(&self, conn: &ConnCtx) -> Result<(Principal, bool), v1::Error> {
        let p = conn.principal().ok_or_else(unauthenticated)?;
        let g = self.group_id_for(p.user_id, "user")?;
        let Some(group) = self.node.serving_group(g) else {
            if self.served_elsewhere(g) {
                return Ok((p, false));
            }
            return Err(self.unserved(g, p.user_id, "user"));
        };
        self.check_session(&group, p).await.map(|p| (p, true))
    }

    /// `p` if its session is live in `group`, this node's replica of its user's group.
    async fn check_session(&self, group: &Group, p: Principal) -> Result<Principal, v1::Error> {
        // A revoked session stops working at once, not only on the next connection.
        let has = |g: &Group| g.shared().read().has_session(p.user_id, p.session_id);
        // A replica that was just promoted by a replica move may not have applied the
        // login yet: before refusing, catch up with the leader (a read barrier).
        if !has(group) {
            // Boxed: rare, and openraft's read-index future is large (see `propose`).
            Box::pin(self.node.read_barrier(group.id()))
                .await
                .map_err(propose_error)?;
        }
        if !has(group) {
            // (A connection without live pushes is not in the fan-out registry, which
            // closes a revoked session's live connections: it stays open, and every
            // request of it is refused here.)
            return Err(error(
                ErrorCode::Unauthenticated,
                "this session was revoked or has expired",
            ));
        }
        Ok(p)
    }

    fn event_ack(o: Outcome) -> Result<Resp, v1::Error> {
        match o {
            Outcome::Event {
                chat,
                seq,
                timestamp_ms,
                ..
            } => Ok(Resp::EventAck(v1::EventAck {
                chat_id: chat,
                seq,
                timestamp_ms,
            })),
            o => Err(error(
                ErrorCode::Internal,
                format!("unexpected outcome {o:?}"),
            )),
        }
    }

    /// Reads events `from..=to` of a chat as protocol events, at most `PAGE_BYTES_MAX`
    /// of them (the last ones are dropped first when going forward).
    async fn read_events(
        &self,
        group: &Group,
        chat: ChatId,
        locs: Vec<(u64, EventLoc)>,
    ) -> Result<Vec<v1::Event>, v1::Error> {
        let rows = group
            .read_commands(&locs)
            .await
            .map_err(|e| convert::read_error(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for (seq, loc, cmd, ts) in rows {
            let ev = convert::chat_event(chat, seq, &loc, &cmd, ts).ok_or_else(|| {
                error(
                    ErrorCode::Internal,
                    format!("event {seq} of chat {chat} does not match its command"),
                )
            })?;
            bytes += prost::Message::encoded_len(&ev) + 8;
            if bytes > PAGE_BYTES_MAX && !out.is_empty() {
                break;
            }
            out.push(ev);
        }
        Ok(out)
    }

    /// Checks a `send_message`'s fields; its media reference, converted, when it has one.
    fn check_send_fields(r: &v1::SendMessageRequest) -> Result<Option<chat::MediaRef>, v1::Error> {
        check_len("text", &r.text, TEXT_BYTES_MAX)?;
        if r.client_message_id == 0 {
            return Err(bad("client_message_id must not be 0"));
        }
        let media = r.media.clone().map(convert::media_from_proto).transpose()?;
        if r.text.is_empty() && media.is_none() {
            return Err(bad("a message needs text or media"));
        }
        Ok(media)
    }

    /// Posts a checked `send_message` (its media, if any, checked too) as `user`.
    async fn post(
        &self,
        user: UserId,
        r: v1::SendMessageRequest,
        media: Option<chat::MediaRef>,
    ) -> Result<Resp, v1::Error> {
        let group = self.group_id_for(r.chat_id, "chat")?;
        match self
            .propose(
                group,
                Command::Post {
                    chat: r.chat_id,
                    sender: user,
                    client_message_id: r.client_message_id,
                    text: r.text,
                    media,
                    reply_to: r.reply_to_seq,
                },
            )
            .await?
        {
            Outcome::Event {
                chat,
                seq,
                timestamp_ms,
                deduplicated,
            } => Ok(Resp::SendMessage(v1::SendMessageResponse {
                chat_id: chat,
                seq,
                timestamp_ms,
                deduplicated,
            })),
            o => Err(error(ErrorCode::Internal, format!("unexpected {o:?}"))),
        }
    }

    /// The same checks and effect as [`ChatService::dispatch`] for a `send_message`
    /// without media, as a future a fraction of `dispatch`'s size: the gateway polls it
    /// on the connection's task ([`Service::runs_inline`]), and a post's future is
    /// created, moved and dropped once per post.
    async fn post_inline(
        &self,
        conn: &ConnCtx,
        r: v1::SendMessageRequest,
    ) -> Result<Resp, v1::Error> {
        self.limiter
            .conn_request(conn.connection_id())
            .map_err(|after| rate_limited("requests on this connection", after))?;
        let (me, here) = self.caller(conn).await?;
        self.limiter
            .user_send(me.user_id)
            .map_err(|after| rate_limited("messages from this user", after))?;
        if !here {
            return Box::pin(self.forward(me, Req::SendMessage(r), false)).await;
        }
        let media = Self::check_send_fields(&r)?;
        debug_assert!(
            media.is_none(),
            "runs_inline admits posts without media only"
        );
        self.post(me.user_id, r, media).await
    }

    fn member_check(
        group: &Group,
        chat: ChatId,
        user: UserId,
    ) -> Result<chat::ChatView, v1::Error> {
        let state = group.shared().read();
        let view = state
            .chat(chat)
            .ok_or_else(|| error(ErrorCode::NotFound, format!("no chat {chat}")))?;
        if state.role(chat, user).is_none() {
            return Err(error(
                ErrorCode::PermissionDenied,
                format!("user {user} is not a member of chat {chat}"),
            ));
        }
        Ok(view)
    }

    async fn dispatch(&self, conn: &ConnCtx, request_id: u64, req: Req) -> Result<Resp, v1::Error> {
        // Media parts and download chunks are bounded by bytes and by the in-flight
        // limit; counting them as requests would cap a transfer at 1,000 × 512 KiB/s.
        if !matches!(req, Req::MediaUploadPart(_) | Req::MediaDownload(_)) {
            self.limiter
                .conn_request(conn.connection_id())
                .map_err(|after| rate_limited("requests on this connection", after))?;
        }
        match req {
            Req::Handshake(_) | Req::Ping(_) => Err(bad("handled by the gateway")),
            Req::CreateUser(r) => {
                if !self.dev_mode && conn.principal().is_none() {
                    return Err(unauthenticated());
                }
                if !chat::state::valid_user_name(&r.name) {
                    return Err(bad(format!(
                        "user name {:?} is not 1 to 32 bytes of a-z, 0-9 and _",
                        r.name
                    )));
                }
                // Handles hash over the groups of the bootstrap only: a handle's
                // uniqueness is checked in the one group its hash names.
                let g = 1 + group_of_name(&r.name, self.node.placement().user_groups);
                let group = g;
                let token = random_hex();
                match self
                    .propose(
                        group,
                        Command::CreateUser {
                            name: r.name,
                            login_token_hash: hash_token(&token),
                        },
                    )
                    .await?
                {
                    Outcome::UserCreated { user } => Ok(Resp::CreateUser(v1::CreateUserResponse {
                        user_id: user,
                        login_token: if self.dev_mode { token } else { String::new() },
                    })),
                    o => Err(error(ErrorCode::Internal, format!("unexpected {o:?}"))),
                }
            }
            Req::Login(r) => {
                check_len("device id", &r.device_id, DEVICE_ID_BYTES_MAX)?;
                check_len("device name", &r.device_name, DEVICE_ID_BYTES_MAX)?;
                if r.device_id.is_empty() {
                    return Err(bad("device id is empty"));
                }
                let group = self.group_id_for(r.user_id, "user").map_err(|_| {
                    error(ErrorCode::Unauthenticated, "unknown user or wrong token")
                })?;
                let session_token = format!("{}.{}", r.user_id, random_hex());
                match self
                    .propose(
                        group,
                        Command::Login {
                            user: r.user_id,
                            login_token_hash: hash_token(&r.login_token),
                            device_id: r.device_id.clone(),
                            device_name: r.device_name,
                            session_token_hash: hash_token(&session_token),
                        },
                    )
                    .await?
                {
                    Outcome::LoggedIn { user, session_id } => {
                        let principal = Principal {
                            user_id: user,
                            session_id,
                            device_id: r.device_id.into(),
                        };
                        self.register_live(&principal, conn);
                        conn.set_principal(Some(principal));
                        Ok(Resp::Login(v1::LoginResponse {
                            user_id: user,
                            session_id,
                            session_token,
                        }))
                    }
                    o => Err(error(ErrorCode::Internal, format!("unexpected {o:?}"))),
                }
            }
            other => {
                let (me, here) = self.caller(conn).await?;
                // Requests that create messages count against the user's send rate,
                // across all of the user's connections on this node.
                if matches!(
                    other,
                    Req::SendMessage(_)
                        | Req::EditMessage(_)
                        | Req::DeleteMessage(_)
                        | Req::React(_)
                        | Req::Pin(_)
                        | Req::CreateChat(_)
                ) {
                    self.limiter
                        .user_send(me.user_id)
                        .map_err(|after| rate_limited("messages from this user", after))?;
                }
                if Self::forwardable(&other) && (!here || self.reads_elsewhere(me.user_id, &other))
                {
                    return Box::pin(self.forward(me, other, here)).await;
                }
                if !here {
                    // Bound to this connection: answered here once the session is
                    // checked where the user's group is.
                    Box::pin(self.check_session_elsewhere(&me)).await?;
                }
                self.dispatch_authenticated(conn, request_id, me, other)
                    .await
            }
        }
    }

    async fn dispatch_authenticated(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        me: Principal,
        req: Req,
    ) -> Result<Resp, v1::Error> {
        let user = me.user_id;
        match req {
            media @ (Req::MediaUploadStart(_)
            | Req::MediaUploadPart(_)
            | Req::MediaUploadStatus(_)
            | Req::MediaUploadFinish(_)) => self.media.handle(user, media, false).await,
            read @ (Req::MediaDownload(_) | Req::MediaInfo(_)) => {
                Box::pin(self.media_read(user, read)).await
            }
            Req::ListSessions(_) => {
                let group = &self.group_for(user, "user")?;
                let sessions = group.shared().read().sessions(user);
                Ok(Resp::ListSessions(v1::ListSessionsResponse {
                    sessions: sessions
                        .into_iter()
                        .map(|s| v1::Session {
                            session_id: s.session_id,
                            current: s.session_id == me.session_id,
                            device_id: s.device_id,
                            device_name: s.device_name,
                            created_at_ms: s.created_ms,
                            last_seen_at_ms: s.created_ms,
                        })
                        .collect(),
                }))
            }
            Req::RevokeSession(r) => {
                let group = self.group_id_for(user, "user")?;
                self.propose(
                    group,
                    Command::RevokeSession {
                        user,
                        session_id: r.session_id,
                    },
                )
                .await?;
                Ok(Resp::RevokeSession(v1::RevokeSessionResponse {}))
            }
            Req::CreateChat(r) => {
                let kind = convert::kind_from_proto(r.kind)?;
                check_len("title", &r.title, TITLE_BYTES_MAX)?;
                if r.member_ids.len() > PAGE_ITEMS_MAX as usize {
                    return Err(error(
                        ErrorCode::TooLarge,
                        format!(
                            "{} initial members, at most {PAGE_ITEMS_MAX}",
                            r.member_ids.len()
                        ),
                    ));
                }
                // Checked where their group is here; a node holding them all answers
                // otherwise when there is one (`forward.rs`), else, as an invite, the
                // others are left unchecked.
                for m in &r.member_ids {
                    self.check_user_exists(*m).await?;
                }
                // A direct chat lives with the smaller of its two users, so creating it
                // twice finds the first one. Other chats go round-robin over every group
                // from the creator's, so groups added later take their share.
                let group = match (kind, r.member_ids.first()) {
                    (ChatKind::Direct, Some(other)) => {
                        self.group_id_for(user.min(*other), "user")?
                    }
                    _ => {
                        let own = self.group_id_for(user, "user")?;
                        let groups = self.node.chat_groups().max(1);
                        let k = self
                            .chats_created
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        1 + (own - 1 + k) % groups
                    }
                };
                let outcome = self
                    .propose(
                        group,
                        Command::CreateChat {
                            creator: user,
                            kind,
                            title: r.title,
                            members: r.member_ids.clone(),
                        },
                    )
                    .await?;
                let Outcome::Event {
                    chat,
                    seq,
                    deduplicated,
                    ..
                } = outcome
                else {
                    return Err(error(
                        ErrorCode::Internal,
                        format!("unexpected {outcome:?}"),
                    ));
                };
                if !deduplicated {
                    self.await_chat_lists(group_of(chat)).await;
                }
                Ok(Resp::CreateChat(v1::CreateChatResponse {
                    chat_id: chat,
                    seq,
                }))
            }
            Req::Invite(r) => {
                self.check_user_exists(r.user_id).await?;
                self.membership_change(
                    Command::Invite {
                        chat: r.chat_id,
                        actor: user,
                        user: r.user_id,
                    },
                    true,
                )
                .await
            }
            Req::RemoveMember(r) => {
                self.membership_change(
                    Command::RemoveMember {
                        chat: r.chat_id,
                        actor: user,
                        user: r.user_id,
                    },
                    true,
                )
                .await
            }
            Req::LeaveChat(r) => {
                self.membership_change(
                    Command::Leave {
                        chat: r.chat_id,
                        actor: user,
                    },
                    true,
                )
                .await
            }
            Req::Ban(r) => {
                self.membership_change(
                    Command::Ban {
                        chat: r.chat_id,
                        actor: user,
                        user: r.user_id,
                    },
                    true,
                )
                .await
            }
            Req::Unban(r) => {
                self.membership_change(
                    Command::Unban {
                        chat: r.chat_id,
                        actor: user,
                        user: r.user_id,
                    },
                    false,
                )
                .await
            }
            Req::SetRole(r) => {
                let role = convert::role_from_proto(r.role)?;
                self.membership_change(
                    Command::SetRole {
                        chat: r.chat_id,
                        actor: user,
                        user: r.user_id,
                        role,
                    },
                    false,
                )
                .await
            }
            Req::JoinChat(r) => {
                self.membership_change(
                    Command::Join {
                        chat: r.chat_id,
                        actor: user,
                    },
                    true,
                )
                .await
            }
            Req::ListChats(r) => {
                let limit = check_limit(r.limit)?;
                let ugroup = &self.group_for(user, "user")?;
                let (ids, has_more) =
                    ugroup
                        .shared()
                        .read()
                        .user_chats(user, r.after_chat_id, limit);
                let mut chats = Vec::with_capacity(ids.len());
                // Chats of groups this node holds no replica of, by group: summarized
                // where their group is (`forward.rs`).
                let mut elsewhere: Vec<(GroupId, Vec<SyncAsk>)> = Vec::new();
                for id in ids {
                    let read_seq = ugroup.shared().read().read_marker(user, id);
                    let Ok(group) = &self.group_for(id, "chat") else {
                        let g = self.group_id_for(id, "chat")?;
                        add_by_group(
                            &mut elsewhere,
                            g,
                            SyncAsk {
                                chat: id,
                                last: read_seq,
                                read_seq,
                            },
                        );
                        continue;
                    };
                    chats.extend(Self::chat_summary(group, id, user, read_seq));
                }
                for (g, asks) in elsewhere {
                    let summaries = if self.served_elsewhere(g) {
                        Box::pin(self.summaries_elsewhere(g, user, &asks))
                            .await
                            .ok()
                    } else {
                        None
                    };
                    // No node answered (or none holds the group): listed with what this
                    // node knows rather than left out.
                    chats.extend(summaries.unwrap_or_else(|| {
                        asks.iter()
                            .map(|a| v1::ChatSummary {
                                chat_id: a.chat,
                                read_seq: a.read_seq,
                                ..Default::default()
                            })
                            .collect()
                    }));
                }
                chats.sort_by_key(|c| c.chat_id);
                Ok(Resp::ListChats(v1::ListChatsResponse { chats, has_more }))
            }
            Req::ListMembers(r) => {
                let limit = check_limit(r.limit)?;
                let group = &self.group_for(r.chat_id, "chat")?;
                Self::member_check(group, r.chat_id, user)?;
                let (members, has_more) = group
                    .shared()
                    .read()
                    .members(r.chat_id, r.after_user_id, limit)
                    .unwrap_or_default();
                Ok(Resp::ListMembers(v1::ListMembersResponse {
                    members: members
                        .into_iter()
                        .map(|m| v1::Member {
                            user_id: m.user,
                            role: convert::role_to_proto(m.role),
                            joined_seq: m.joined_seq,
                        })
                        .collect(),
                    has_more,
                }))
            }
            Req::SendMessage(r) => {
                let media = Self::check_send_fields(&r)?;
                if let Some(m) = &media {
                    // The file must exist and the sender may read it; posting then lets
                    // the chat's members read it (`chat/media.rs`).
                    self.check_media_send(user, m).await?;
                }
                self.post(user, r, media).await
            }
            Req::EditMessage(r) => {
                check_len("text", &r.text, TEXT_BYTES_MAX)?;
                let group = self.group_id_for(r.chat_id, "chat")?;
                let o = self
                    .propose(
                        group,
                        Command::Edit {
                            chat: r.chat_id,
                            sender: user,
                            target: r.seq,
                            text: r.text,
                        },
                    )
                    .await?;
                Self::event_ack(o)
            }
            Req::DeleteMessage(r) => {
                let group = self.group_id_for(r.chat_id, "chat")?;
                let o = self
                    .propose(
                        group,
                        Command::Delete {
                            chat: r.chat_id,
                            sender: user,
                            target: r.seq,
                        },
                    )
                    .await?;
                Self::event_ack(o)
            }
            Req::React(r) => {
                check_len("reaction", &r.reaction, REACTION_BYTES_MAX)?;
                let add = match v1::ReactionChange::try_from(r.change) {
                    Ok(v1::ReactionChange::Add) => true,
                    Ok(v1::ReactionChange::Remove) => false,
                    _ => return Err(bad("reaction change must be add or remove")),
                };
                let group = self.group_id_for(r.chat_id, "chat")?;
                let o = self
                    .propose(
                        group,
                        Command::React {
                            chat: r.chat_id,
                            sender: user,
                            target: r.seq,
                            reaction: r.reaction,
                            add,
                        },
                    )
                    .await?;
                Self::event_ack(o)
            }
            Req::Pin(r) => {
                let pin = match v1::PinChange::try_from(r.change) {
                    Ok(v1::PinChange::Pin) => true,
                    Ok(v1::PinChange::Unpin) => false,
                    _ => return Err(bad("pin change must be pin or unpin")),
                };
                let group = self.group_id_for(r.chat_id, "chat")?;
                let o = self
                    .propose(
                        group,
                        Command::Pin {
                            chat: r.chat_id,
                            sender: user,
                            target: r.seq,
                            pin,
                        },
                    )
                    .await?;
                Self::event_ack(o)
            }
            Req::History(r) => {
                let limit = check_limit(r.limit)? as u64;
                let group = &self.group_for(r.chat_id, "chat")?;
                // Linearizable: a client that got seq N from a send then reads sees N.
                self.node
                    .read_barrier(group.id())
                    .await
                    .map_err(propose_error)?;
                let view = Self::member_check(group, r.chat_id, user)?;
                let head = view.head_seq;
                // Retention: history starts at the chat's first retained seq
                // (wire/PROTOCOL.md); a read from below it starts there.
                let first_kept = group.shared().read().chat_first_seq(r.chat_id).unwrap_or(1);
                let backward = match v1::Direction::try_from(r.direction) {
                    Ok(v1::Direction::Forward) => false,
                    Ok(v1::Direction::Backward) => true,
                    _ => return Err(bad("direction must be forward or backward")),
                };
                let (from, to) = if backward {
                    let top = if r.from_seq == 0 {
                        head
                    } else {
                        r.from_seq.min(head)
                    };
                    (top.saturating_sub(limit - 1).max(first_kept), top)
                } else {
                    let from = r.from_seq.max(first_kept);
                    (from, from.saturating_add(limit - 1).min(head))
                };
                let locs = group
                    .shared()
                    .read()
                    .chat_events(r.chat_id, from, to)
                    .unwrap_or_default();
                let mut events = self.read_events(group, r.chat_id, locs.clone()).await?;
                if backward && events.len() < locs.len() {
                    // Over the byte budget going backward: keep the newest ones.
                    let keep = events.len();
                    let tail = locs[locs.len() - keep..].to_vec();
                    events = self.read_events(group, r.chat_id, tail).await?;
                }
                let has_more = match (backward, events.first(), events.last()) {
                    (true, Some(first), _) => first.seq > first_kept,
                    (false, _, Some(last)) => last.seq < head,
                    _ => false,
                };
                Ok(Resp::History(v1::HistoryResponse {
                    events,
                    head_seq: head,
                    has_more,
                }))
            }
            Req::GetBySeq(r) => {
                if r.seqs.is_empty() || r.seqs.len() > PAGE_ITEMS_MAX as usize {
                    return Err(bad(format!("ask for 1 to {PAGE_ITEMS_MAX} seqs")));
                }
                let group = &self.group_for(r.chat_id, "chat")?;
                self.node
                    .read_barrier(group.id())
                    .await
                    .map_err(propose_error)?;
                let view = Self::member_check(group, r.chat_id, user)?;
                let mut locs = Vec::with_capacity(r.seqs.len());
                {
                    let st = group.shared().read();
                    let first_kept = st.chat_first_seq(r.chat_id).unwrap_or(1);
                    for s in &r.seqs {
                        if *s != 0 && *s < first_kept {
                            return Err(error(
                                ErrorCode::NotFound,
                                format!(
                                    "chat {} seq {s} is below retention: its first retained \
                                     seq is {first_kept}",
                                    r.chat_id
                                ),
                            ));
                        }
                        if *s == 0 || *s > view.head_seq {
                            return Err(error(
                                ErrorCode::NotFound,
                                format!(
                                    "chat {} has no seq {s} (head {})",
                                    r.chat_id, view.head_seq
                                ),
                            ));
                        }
                        locs.extend(st.chat_events(r.chat_id, *s, *s).unwrap_or_default());
                    }
                }
                let events = self.read_events(group, r.chat_id, locs).await?;
                Ok(Resp::GetBySeq(v1::GetBySeqResponse { events }))
            }
            Req::MarkRead(r) => {
                let group = &self.group_for(r.chat_id, "chat")?;
                let view = Self::member_check(group, r.chat_id, user)?;
                if r.seq > view.head_seq {
                    return Err(bad(format!(
                        "seq {} is beyond the chat's head {}",
                        r.seq, view.head_seq
                    )));
                }
                let ugroup = self.group_id_for(user, "user")?;
                match self
                    .propose(
                        ugroup,
                        Command::MarkRead {
                            user,
                            chat: r.chat_id,
                            seq: r.seq,
                        },
                    )
                    .await?
                {
                    Outcome::UserEvent { read_seq, .. } => {
                        Ok(Resp::MarkRead(v1::MarkReadResponse {
                            chat_id: r.chat_id,
                            read_seq,
                            unread_count: unread_count(group, r.chat_id, user, read_seq),
                        }))
                    }
                    o => Err(error(ErrorCode::Internal, format!("unexpected {o:?}"))),
                }
            }
            Req::GetUnreadCounts(r) => {
                if r.chat_ids.len() > PAGE_ITEMS_MAX as usize {
                    return Err(bad(format!("ask for at most {PAGE_ITEMS_MAX} chats")));
                }
                let ugroup = &self.group_for(user, "user")?;
                let ids = if r.chat_ids.is_empty() {
                    ugroup.shared().read().user_chats(user, 0, usize::MAX).0
                } else {
                    let mut ids = r.chat_ids.clone();
                    ids.sort_unstable();
                    ids.dedup();
                    ids
                };
                let mut counts = Vec::new();
                // Chats of groups this node holds no replica of, by group: counted where
                // their group is (the part of a sync without events, `forward.rs`).
                let mut elsewhere: Vec<(GroupId, Vec<SyncAsk>)> = Vec::new();
                for id in ids {
                    let read_seq = ugroup.shared().read().read_marker(user, id);
                    let g = self.group_id_for(id, "chat")?;
                    if self.node.serving_group(g).is_none() && self.served_elsewhere(g) {
                        add_by_group(
                            &mut elsewhere,
                            g,
                            SyncAsk {
                                chat: id,
                                last: read_seq,
                                read_seq,
                            },
                        );
                        continue;
                    }
                    let group = &self.group_for(id, "chat")?;
                    let view = Self::member_check(group, id, user)?;
                    counts.push(v1::UnreadCount {
                        chat_id: id,
                        read_seq,
                        head_seq: view.head_seq,
                        unread_count: unread_count(group, id, user, read_seq),
                    });
                }
                for (g, asks) in elsewhere {
                    let (differences, _) = Box::pin(forward::ask_sync_part(
                        &self.node, g, user, &asks, 1, true, 0,
                    ))
                    .await?;
                    for d in differences {
                        if d.not_member {
                            return Err(error(
                                ErrorCode::PermissionDenied,
                                format!("user {user} is not a member of chat {}", d.chat_id),
                            ));
                        }
                        counts.push(v1::UnreadCount {
                            chat_id: d.chat_id,
                            read_seq: d.read_seq,
                            head_seq: d.head_seq,
                            unread_count: d.unread_count,
                        });
                    }
                }
                if r.chat_ids.is_empty() {
                    counts.retain(|c| c.unread_count > 0);
                }
                counts.sort_by_key(|c| c.chat_id);
                Ok(Resp::GetUnreadCounts(v1::GetUnreadCountsResponse {
                    counts,
                }))
            }
            Req::Typing(r) => {
                let group = self.group_for(r.chat_id, "chat")?;
                let view = Self::member_check(&group, r.chat_id, user)?;
                let role = group.shared().read().role(r.chat_id, user);
                if view.kind == ChatKind::Channel && role < Some(chat::Role::Admin) {
                    return Err(error(
                        ErrorCode::PermissionDenied,
                        "only admins post, or type, in a channel",
                    ));
                }
                self.hub.typing(&group, r.chat_id, user, r.typing);
                Ok(Resp::Typing(v1::TypingResponse {}))
            }
            Req::GetPresence(r) => {
                if r.user_ids.len() > PAGE_ITEMS_MAX as usize {
                    return Err(bad(format!(
                        "{} users asked about, more than {PAGE_ITEMS_MAX}",
                        r.user_ids.len()
                    )));
                }
                let presences =
                    self.hub
                        .get_presence(conn.connection_id(), conn.pushes(), &r.user_ids);
                Ok(Resp::GetPresence(v1::GetPresenceResponse { presences }))
            }
            Req::Subscribe(r) => {
                let g = self.group_id_for(r.chat_id, "chat")?;
                if self.node.serving_group(g).is_none() && self.served_elsewhere(g) {
                    Box::pin(self.subscribe_elsewhere(conn, request_id, user, r, g)).await
                } else {
                    self.subscribe(conn, request_id, user, r)
                }
            }
            Req::Sync(r) => self.sync(user, r).await,
            // Secret chats: `secret.rs`.
            Req::Secret(r) => self.secret(me, r).await,
            Req::Unsubscribe(r) => {
                let key = (conn.connection_id(), r.subscription_id);
                let task = self
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                match task {
                    Some(t) => {
                        t.abort();
                        Ok(Resp::Unsubscribe(v1::UnsubscribeResponse {}))
                    }
                    None => Err(error(
                        ErrorCode::NotFound,
                        format!("no subscription {} on this connection", r.subscription_id),
                    )),
                }
            }
            // Bots (issue 11): accounts are made here, the bot API is on the HTTP port.
            Req::CreateBot(r) => crate::bot::account::create_bot(&self.node, user, r).await,
            Req::ListBots(_) => crate::bot::account::list_bots(&self.node, user),
            Req::ResetBotToken(r) => {
                crate::bot::account::reset_bot_token(&self.node, user, r).await
            }
            Req::Handshake(_) | Req::Ping(_) | Req::CreateUser(_) | Req::Login(_) => {
                Err(bad("handled before authentication"))
            }
        }
    }

    /// Proposes a change of a chat's members; `lists` when it changes a member's chat
    /// list (which then follows through the chat-list outbox).
    async fn membership_change(&self, cmd: Command, lists: bool) -> Result<Resp, v1::Error> {
        let chat = cmd.chat().expect("membership commands name a chat");
        let group = self.group_id_for(chat, "chat")?;
        let o = self.propose(group, cmd).await?;
        if lists {
            self.await_chat_lists(group).await;
        }
        Self::event_ack(o)
    }

    /// Answers `sync` (see `SyncRequest` in the protocol): per chat, a bounded page of
    /// the events after the device's position, with head, read marker and unread count;
    /// `too_long` when the page stops short of the head. One byte budget
    /// ([`PAGE_BYTES_MAX`]) covers the whole answer so that it fits one frame.
    async fn sync(&self, user: UserId, r: v1::SyncRequest) -> Result<Resp, v1::Error> {
        if r.chats.len() > PAGE_ITEMS_MAX as usize {
            return Err(bad(format!("sync at most {PAGE_ITEMS_MAX} chats at once")));
        }
        let per_chat = match r.events_per_chat_max {
            0 => PAGE_ITEMS_MAX as u64,
            n => check_limit(n)? as u64,
        };
        let ugroup = &self.group_for(user, "user")?;
        let all = r.chats.is_empty();
        let (positions, has_more): (Vec<(ChatId, u64)>, bool) = if all {
            let st = ugroup.shared().read();
            let (ids, more) = st.user_chats(user, r.after_chat_id, PAGE_ITEMS_MAX as usize);
            let positions = ids
                .into_iter()
                .map(|c| (c, st.read_marker(user, c)))
                .collect();
            (positions, more)
        } else {
            let mut v: Vec<_> = r.chats.iter().map(|p| (p.chat_id, p.last_seq)).collect();
            v.sort_unstable();
            v.dedup_by_key(|p| p.0);
            (v, false)
        };
        // The chats by group, each with the device's position and the user's read marker
        // (from the user's group, here), the groups in the order of their first chat.
        let mut by_group: Vec<(GroupId, Vec<SyncAsk>)> = Vec::new();
        {
            let st = ugroup.shared().read();
            for (chat, last) in positions {
                let g = self.group_id_for(chat, "chat")?;
                let read_seq = st.read_marker(user, chat);
                add_by_group(
                    &mut by_group,
                    g,
                    SyncAsk {
                        chat,
                        last,
                        read_seq,
                    },
                );
            }
        }
        // One byte budget for the whole answer, spent group by group: a group asked
        // after it ran out still answers heads and read markers (`too_long`).
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (g, asks) in by_group {
            let budget = PAGE_BYTES_MAX.saturating_sub(bytes);
            let (differences, used) = match self.node.serving_group(g) {
                Some(group) => {
                    self.sync_part_here(&group, user, &asks, per_chat, all, budget, true)
                        .await?
                }
                // A chat group this node holds no replica of: its half of the answer
                // comes from a node that does (`forward.rs`).
                None if self.served_elsewhere(g) => {
                    Box::pin(forward::ask_sync_part(
                        &self.node, g, user, &asks, per_chat, all, budget,
                    ))
                    .await?
                }
                None => return Err(self.unserved(g, asks[0].chat, "chat")),
            };
            bytes += used;
            out.extend(differences);
        }
        out.sort_by_key(|d| d.chat_id);
        Ok(Resp::Sync(v1::SyncResponse {
            chats: out,
            has_more,
        }))
    }

    /// The summary of `chat` (of `group`, a replica here) for `user` with read marker
    /// `read_seq`, as `list_chats` lists it; `None` when the chat is gone or `user` is not
    /// a member.
    pub(crate) fn chat_summary(
        group: &Group,
        chat: ChatId,
        user: UserId,
        read_seq: u64,
    ) -> Option<v1::ChatSummary> {
        let (view, role) = {
            let st = group.shared().read();
            (st.chat(chat), st.role(chat, user))
        };
        let (view, role) = (view?, role?);
        Some(v1::ChatSummary {
            chat_id: chat,
            kind: convert::kind_to_proto(view.kind),
            title: view.title,
            role: convert::role_to_proto(role),
            head_seq: view.head_seq,
            read_seq,
            unread_count: unread_count(group, chat, user, read_seq),
            member_count: view.member_count,
        })
    }

    /// The differences of `asks`, chats of `group` (a replica here), for `user`: after
    /// one read barrier (linearizable, like history: a send acknowledged before is in
    /// the answer) unless `barrier` is false (heads from the replica's applied state),
    /// with events within `budget` bytes. With `all` a chat at its head is answered too.
    /// Returns them and the bytes their events took.
    #[allow(clippy::too_many_arguments)] // a sync part's fields, spelled out at its two callers
    pub(crate) async fn sync_part_here(
        &self,
        group: &Group,
        user: UserId,
        asks: &[SyncAsk],
        per_chat: u64,
        all: bool,
        budget: usize,
        barrier: bool,
    ) -> Result<(Vec<v1::ChatDifference>, usize), v1::Error> {
        if barrier {
            self.node
                .read_barrier(group.id())
                .await
                .map_err(propose_error)?;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for &SyncAsk {
            chat,
            last,
            read_seq,
        } in asks
        {
            let view = {
                let st = group.shared().read();
                st.chat(chat).filter(|_| st.role(chat, user).is_some())
            };
            let Some(view) = view else {
                out.push(v1::ChatDifference {
                    chat_id: chat,
                    not_member: true,
                    ..Default::default()
                });
                continue;
            };
            let head = view.head_seq;
            if !all && head <= last {
                continue;
            }
            let mut events = Vec::new();
            if last < head && bytes < budget {
                // Retention: below the chat's first retained seq, start there.
                let from = (last + 1).max(group.shared().read().chat_first_seq(chat).unwrap_or(1));
                let to = head.min(from + per_chat - 1);
                let locs = group
                    .shared()
                    .read()
                    .chat_events(chat, from, to)
                    .unwrap_or_default();
                let rows = group
                    .read_commands(&locs)
                    .await
                    .map_err(|e| convert::read_error(&e))?;
                for (seq, loc, cmd, ts) in rows {
                    let ev = convert::chat_event(chat, seq, &loc, &cmd, ts).ok_or_else(|| {
                        error(
                            ErrorCode::Internal,
                            format!("event {seq} of chat {chat} does not match its command"),
                        )
                    })?;
                    let len = prost::Message::encoded_len(&ev) + 8;
                    if bytes + len > budget {
                        bytes = budget;
                        break;
                    }
                    bytes += len;
                    events.push(ev);
                }
            }
            let reached = events.last().map_or(last, |e| e.seq);
            out.push(v1::ChatDifference {
                chat_id: chat,
                head_seq: head,
                read_seq,
                unread_count: unread_count(group, chat, user, read_seq),
                too_long: reached < head,
                events,
                not_member: false,
            });
        }
        Ok((out, bytes))
    }

    fn subscribe(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        user: UserId,
        r: v1::SubscribeRequest,
    ) -> Result<Resp, v1::Error> {
        let group = self.group_for(r.chat_id, "chat")?;
        let view = Self::member_check(&group, r.chat_id, user)?;
        let chat = r.chat_id;
        let mut next = if r.from_seq == 0 {
            view.head_seq + 1
        } else {
            r.from_seq
        };
        let pushes = conn.pushes().clone();
        let key = (conn.connection_id(), request_id);
        let task = tokio::spawn(async move {
            let mut applied = group.shared().applied();
            loop {
                let (head, member) = {
                    let st = group.shared().read();
                    (
                        st.chat(chat).map_or(0, |c| c.head_seq),
                        st.role(chat, user).is_some(),
                    )
                };
                if !member {
                    let _ = pushes.push(
                        request_id,
                        v1::push::Kind::SubscriptionEnded(v1::SubscriptionEnded {
                            chat_id: chat,
                            next_seq: next,
                            reason: Some(error(
                                ErrorCode::PermissionDenied,
                                "no longer a member of this chat",
                            )),
                        }),
                    );
                    return;
                }
                // Retention: a subscription from below the chat's first retained seq
                // continues there (wire/PROTOCOL.md, "History below retention").
                next = next.max(group.shared().read().chat_first_seq(chat).unwrap_or(1));
                if next <= head {
                    let to = head.min(next + SUBSCRIPTION_PUSH_EVENTS_MAX as u64 - 1);
                    let locs = group
                        .shared()
                        .read()
                        .chat_events(chat, next, to)
                        .unwrap_or_default();
                    let ended = |message: String| {
                        v1::push::Kind::SubscriptionEnded(v1::SubscriptionEnded {
                            chat_id: chat,
                            next_seq: next,
                            reason: Some(error(ErrorCode::Internal, message)),
                        })
                    };
                    let rows = match group.read_commands(&locs).await {
                        Ok(rows) => rows,
                        Err(e) => {
                            let _ = pushes.push(
                                request_id,
                                v1::push::Kind::SubscriptionEnded(v1::SubscriptionEnded {
                                    chat_id: chat,
                                    next_seq: next,
                                    reason: Some(convert::read_error(&e)),
                                }),
                            );
                            return;
                        }
                    };
                    // Every seq in order or the subscription ends: a client must never
                    // see a gap it cannot tell from a dropped push.
                    let events: Option<Vec<v1::Event>> = rows
                        .iter()
                        .map(|(s, l, c, ts)| convert::chat_event(chat, *s, l, c, *ts))
                        .collect();
                    let Some(events) = events.filter(|e| !e.is_empty() && e.len() == locs.len())
                    else {
                        let what = format!("events from seq {next} of chat {chat} are unreadable");
                        let _ = pushes.push(request_id, ended(what));
                        return;
                    };
                    next += events.len() as u64;
                    // Catching up is paced by the reader: wait for room rather than be
                    // cut off as a slow reader for history it asked for. Pushes stay
                    // under the frame limit whatever the events' sizes.
                    for events in crate::fanout::split_by_bytes(events) {
                        pushes.room().await;
                        if let Err(e) = pushes.push(
                            request_id,
                            v1::push::Kind::ChatEvents(v1::ChatEvents { events }),
                        ) {
                            tracing::debug!(chat, error = ?e, "subscription push refused");
                            return;
                        }
                    }
                    continue;
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, task.abort_handle());
        Ok(Resp::Subscribe(v1::SubscribeResponse {
            chat_id: chat,
            head_seq: view.head_seq,
        }))
    }
}

impl Service for ChatService {
    async fn authenticate(&self, token: Option<&str>) -> Result<Option<Principal>, v1::Error> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        self.authenticate_token(token, true).await.map(Some)
    }

    async fn handle(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: Req,
    ) -> Result<Resp, v1::Error> {
        self.dispatch(conn, request_id, request).await
    }

    /// Requests that are one proposal once checked: posts and the other
    /// message-creating requests. Reads (history, sync, unread counts, which may walk
    /// many events), media and membership changes (which wait for chat lists) keep a
    /// task of their own.
    async fn handle_inline(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        request: Req,
    ) -> Result<Resp, v1::Error> {
        match request {
            Req::SendMessage(r) if r.media.is_none() => self.post_inline(conn, r).await,
            // Boxed: `dispatch`'s future is large, and the inline future stays small.
            other => Box::pin(self.dispatch(conn, request_id, other)).await,
        }
    }

    fn runs_inline(&self, request: &Req) -> bool {
        match request {
            // A message with media first checks the media store.
            Req::SendMessage(send) => send.media.is_none(),
            Req::EditMessage(_) | Req::DeleteMessage(_) | Req::React(_) | Req::Pin(_) => true,
            _ => false,
        }
    }

    fn node_id(&self) -> u64 {
        self.node.node_id()
    }

    fn connection_opened(&self, conn: &ConnCtx) {
        if let Some(principal) = conn.principal() {
            self.register_live(&principal, conn);
        }
    }

    fn connection_closed(&self, conn: &ConnCtx) {
        self.hub.unregister(conn.connection_id());
        self.limiter.conn_closed(conn.connection_id());
        let id = conn.connection_id();
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(c, _), t| {
                if *c == id {
                    t.abort();
                    false
                } else {
                    true
                }
            });
    }
}
