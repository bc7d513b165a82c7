//! Forwarded client requests: a client may connect to any node of a cluster.
//!
//! What it owns: answering, on a node that serves no replica of a group a request needs,
//! by sending the whole request to a node that serves one (the `client_request` node
//! message, `wire/proto/node.proto`), and serving such requests from other nodes. A
//! request needs the caller's user group (its session is checked there, and most
//! requests read it) and, for a read naming a chat or another user, that id's group
//! (`ChatService::reads_elsewhere`). The target is a serving replica of the first
//! needed group this node lacks, preferring one that serves every needed group; it
//! answers exactly as if the client were connected to it, errors included, and never
//! forwards again. A handshake's session token is checked the same way.
//!
//! A media upload (start, parts, status, finish) goes whole to a replica of the
//! uploader's user group, like any request needing the caller's group: that replica
//! keeps the upload and sends each part to the group's other replicas (`crate::media`),
//! and the placement's order keeps an upload's requests on one replica while it lives
//! (another replica holds the parts it was sent and answers `media_upload_status`).
//!
//! What it must not do: forward what is bound to the client's connection
//! (subscriptions and presence: they push on that connection). Those are answered here:
//! when the caller's user group is elsewhere, after its session was checked there (a
//! `ForwardedRequest` without a request). A subscription to a chat of a group not held
//! here reads the chat from a node that does, a sync part at a time
//! (`ChatService::subscribe_elsewhere`). Media downloads and infos are answered here too
//! when this node stores the file and lets the caller read it, and otherwise asked of
//! the nodes that store it (`media_forward.rs`). Writes need none of this: a proposal
//! reaches its group's leader from any node (`Node::propose`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatlog_raft::GroupId;
use chatlog_raft::chat::{UserId, group_of};
use chatlog_raft::network::ForwardError;
use chatlog_raft::node::Node;
use chatlog_wire::limits::PAGE_ITEMS_MAX;
use chatlog_wire::proto::node::v1::{ForwardedAnswer, ForwardedRequest, SyncPart};
use chatlog_wire::proto::v1::{
    self, ErrorCode, push, request::Kind as Req, response::Kind as Resp,
    secret_request::Kind as SReq,
};
use prost::Message;

use super::{ChatService, PAGE_BYTES_MAX, SUBSCRIPTION_PUSH_EVENTS_MAX, SyncAsk, hash_token};
use crate::gateway::{ConnCtx, Principal};
use crate::service::convert::{error, unavailable_retry};

/// How long a forwarding node waits for the answer. Why: the client library's request
/// timeout (`chatlog_wire::client::REQUEST_TIMEOUT`, 10 s); the serving node gives up on
/// the work a little later (`FORWARDED_WORK_TIMEOUT`, 12 s), so this side decides.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a subscription to a chat of a group without a replica here waits between two
/// looks when nothing wakes it. Why: it wakes when the node's poller of the group
/// delivers (any entry applied, `fanout/remote.rs`), but the poller waits out its full
/// poll while no user with live pushes is online here; a second bounds the delay then.
pub const REMOTE_SUBSCRIPTION_RECHECK: Duration = Duration::from_secs(1);

/// Looks of subscriptions at chats of groups without a replica here (each a forwarded
/// read), since start: `chatlog_remote_subscription_looks_total` in `/metrics`.
pub static REMOTE_SUBSCRIPTION_LOOKS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Client requests this node answered for other nodes (forwarded to it), since start:
/// `chatlog_forwarded_requests_served_total` in `/metrics`.
pub static FORWARDED_REQUESTS_SERVED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Consecutive failed looks after which such a subscription ends with `UNAVAILABLE`
/// (the client subscribes again from `next_seq`). Why: with
/// [`REMOTE_SUBSCRIPTION_RECHECK`] between them, about ten seconds: longer than an
/// election and a replica's restart, shorter than a person waits on a frozen chat.
pub const REMOTE_SUBSCRIPTION_FAILURES_MAX: u32 = 10;

impl ChatService {
    /// Subscribes `conn` to a chat of group `g`, which this node holds no replica of: the
    /// same pushes as a local subscription (`ChatService::subscribe`), read from a node
    /// that holds it, a sync part at a time: events from the position on, each new
    /// event after, in seq order without gaps, ended by `subscription_ended` as a local
    /// one is. It looks again whenever the node's poller of `g` delivered something that
    /// may hold the chat's next events: anything, unless the poller's last answer covered
    /// the user (online here with live pushes) and carried no events of the chat that far
    /// (`Hub::remote_news_may_hold`); and every [`REMOTE_SUBSCRIPTION_RECHECK`] at least.
    pub(super) async fn subscribe_elsewhere(
        &self,
        conn: &ConnCtx,
        request_id: u64,
        user: UserId,
        r: v1::SubscribeRequest,
        g: GroupId,
    ) -> Result<Resp, v1::Error> {
        let chat = r.chat_id;
        let at = move |last: u64| SyncAsk {
            chat,
            last,
            read_seq: 0,
        };
        // The first look: membership and head only, linearizable.
        let Some(head) = ask_head(&self.node, g, user, chat, true).await? else {
            return Err(error(
                ErrorCode::PermissionDenied,
                format!("user {user} is not a member of chat {chat}"),
            ));
        };
        let mut next = if r.from_seq == 0 {
            head + 1
        } else {
            r.from_seq
        };
        let pushes = conn.pushes().clone();
        let node = Arc::clone(&self.node);
        let hub = Arc::clone(&self.hub);
        let task = tokio::spawn(async move {
            let ended = |next: u64, reason: v1::Error| {
                push::Kind::SubscriptionEnded(v1::SubscriptionEnded {
                    chat_id: chat,
                    next_seq: next,
                    reason: Some(reason),
                })
            };
            let mut deliveries = hub.deliveries();
            let mut failures = 0;
            // Whether the last look found nothing new: the next one first reads the
            // chat's head without a read barrier (`ask_head`), and reads events (after a
            // barrier) only once the head moved. Most looks at a quiet chat in a busy
            // group, and every idle recheck, find nothing: each cost a quorum round.
            let mut quiet = false;
            'looks: loop {
                let seen = hub.delivered_through(g);
                deliveries.borrow_and_update();
                REMOTE_SUBSCRIPTION_LOOKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                'look: {
                    if quiet
                        && let Ok(Some(head)) = ask_head(&node, g, user, chat, false).await
                        && head < next
                    {
                        break 'look;
                    }
                    let looked = ask_sync_part(
                        &node,
                        g,
                        user,
                        &[at(next - 1)],
                        SUBSCRIPTION_PUSH_EVENTS_MAX as u64,
                        true,
                        PAGE_BYTES_MAX,
                    )
                    .await;
                    let mut more = false;
                    match looked {
                        Ok((differences, _)) => {
                            failures = 0;
                            let Some(d) = differences.into_iter().find(|d| d.chat_id == chat)
                            else {
                                let reason =
                                    error(ErrorCode::Internal, "a sync part without the chat");
                                let _ = pushes.push(request_id, ended(next, reason));
                                return;
                            };
                            if d.not_member {
                                let reason = error(
                                    ErrorCode::PermissionDenied,
                                    "no longer a member of this chat",
                                );
                                let _ = pushes.push(request_id, ended(next, reason));
                                return;
                            }
                            // Retention: from below the chat's first retained seq the events
                            // start there; after that, every seq in order or the end.
                            if let Some(first) = d.events.first() {
                                next = next.max(first.seq);
                            }
                            let dense = d
                                .events
                                .iter()
                                .enumerate()
                                .all(|(k, e)| e.seq == next + k as u64);
                            if !dense {
                                let reason = error(
                                    ErrorCode::Internal,
                                    format!(
                                        "events from seq {next} of chat {chat} came with a gap"
                                    ),
                                );
                                let _ = pushes.push(request_id, ended(next, reason));
                                return;
                            }
                            quiet = d.events.is_empty();
                            next += d.events.len() as u64;
                            more = !d.events.is_empty() && next <= d.head_seq;
                            for events in crate::fanout::split_by_bytes(d.events) {
                                pushes.room().await;
                                if let Err(e) = pushes.push(
                                    request_id,
                                    push::Kind::ChatEvents(v1::ChatEvents { events }),
                                ) {
                                    tracing::debug!(chat, error = ?e, "subscription push refused");
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            if failures >= REMOTE_SUBSCRIPTION_FAILURES_MAX {
                                let _ = pushes.push(request_id, ended(next, e));
                                return;
                            }
                        }
                    }
                    if more {
                        continue 'looks;
                    }
                }
                // Until the group's poller delivers something that may hold this chat's
                // next events (anything, unless its last answer covered this user:
                // `Hub::remote_news_may_hold`), or the recheck.
                let _ = tokio::time::timeout(REMOTE_SUBSCRIPTION_RECHECK, async {
                    while deliveries.changed().await.is_ok() {
                        if hub.delivered_through(g) != seen
                            && hub.remote_news_may_hold(g, user, chat, next)
                        {
                            break;
                        }
                    }
                })
                .await;
            }
        });
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((conn.connection_id(), request_id), task.abort_handle());
        Ok(Resp::Subscribe(v1::SubscribeResponse {
            chat_id: chat,
            head_seq: head,
        }))
    }

    /// Whether a request needing group `g`, which this node does not serve, goes to
    /// another node (`Node::served_elsewhere`).
    pub(super) fn served_elsewhere(&self, g: GroupId) -> bool {
        self.node.served_elsewhere(g)
    }

    /// The ids whose groups `req` reads besides the caller's user group: a chat (or
    /// secret chat), or other users (a new chat's members, whose existence is checked
    /// where their group is; a secret-chat key; a secret chat's home). Not an invitee:
    /// an invite checks the user only where its group is local, and must work while
    /// that group is down (the chat-list outbox delivers it later).
    fn read_ids(user: UserId, req: &Req) -> Vec<u64> {
        match req {
            Req::CreateChat(r) => r.member_ids.clone(),
            Req::History(r) => vec![r.chat_id],
            Req::GetBySeq(r) => vec![r.chat_id],
            Req::ListMembers(r) => vec![r.chat_id],
            Req::MarkRead(r) => vec![r.chat_id],
            Req::Typing(r) => vec![r.chat_id],
            // Not a sync's or an unread count's chats: where the user's group is, each
            // asks the chat groups it lacks for their part (`ChatService::sync`,
            // [`ask_sync_part`]).
            Req::Secret(v1::SecretRequest { kind: Some(kind) }) => match kind {
                SReq::GetKey(r) => vec![r.user_id],
                SReq::Start(r) => vec![r.user_id, user.min(r.user_id)],
                SReq::Send(r) => vec![r.secret_chat_id],
                SReq::Ack(r) => vec![r.secret_chat_id],
                SReq::Pending(r) if r.secret_chat_id != 0 => vec![r.secret_chat_id],
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    /// Every group a request of `user` reading `ids` ([`ChatService::read_ids`]) needs,
    /// the user's first, each once. Ids naming no group are left out: the request is
    /// refused where it is handled.
    fn needed_groups(&self, user: UserId, ids: Vec<u64>) -> Vec<GroupId> {
        let mut groups = vec![group_of(user)];
        for id in ids {
            if let Ok(g) = self.group_id_for(id, "chat or user")
                && !groups.contains(&g)
            {
                groups.push(g);
            }
        }
        groups
    }

    /// Whether `req` reads a group (other than the caller's user group, checked by
    /// `caller`) that this node serves no replica of but another node does. A new chat's
    /// members are checked where their groups are only when one node holds them all;
    /// otherwise the chat is created here, checking the members whose group is here (as
    /// an invite does).
    pub(super) fn reads_elsewhere(&self, user: UserId, req: &Req) -> bool {
        let ids = Self::read_ids(user, req);
        if ids.is_empty() {
            return false;
        }
        let needed = self.needed_groups(user, ids);
        let elsewhere = needed
            .iter()
            .any(|g| self.node.serving_group(*g).is_none() && self.served_elsewhere(*g));
        if elsewhere && matches!(req, Req::CreateChat(_)) {
            return self.node.another_hosts_all(&needed);
        }
        elsewhere
    }

    /// Whether `req` may be answered by another node (see the module docs).
    pub(super) fn forwardable(req: &Req) -> bool {
        !matches!(
            req,
            Req::Handshake(_)
                | Req::Ping(_)
                | Req::Login(_)
                | Req::CreateUser(_)
                | Req::Subscribe(_)
                | Req::Unsubscribe(_)
                | Req::GetPresence(_)
                | Req::MediaDownload(_)
                | Req::MediaInfo(_)
        )
    }

    /// Answers `req` of `me` on another node (see the module docs).
    /// `checked`: this node checked the session (it holds the user's group), so the
    /// receiver need not.
    pub(super) async fn forward(
        &self,
        me: Principal,
        req: Req,
        checked: bool,
    ) -> Result<Resp, v1::Error> {
        let needed = self.needed_groups(me.user_id, Self::read_ids(me.user_id, &req));
        let missing = needed
            .iter()
            .copied()
            .find(|g| self.node.serving_group(*g).is_none());
        let Some(g) = missing else {
            return Err(error(
                ErrorCode::Unavailable,
                "the request's groups moved here meanwhile: send it again",
            ));
        };
        debug_assert!(Self::forwardable(&req), "{req:?} is not forwarded");
        let body = ForwardedRequest {
            user_id: me.user_id,
            session_id: me.session_id,
            request: Some(v1::Request { kind: Some(req) }),
            session_checked: checked,
            ..ForwardedRequest::default()
        };
        send_forwarded(&self.node, g, &needed, body)
            .await?
            .response
            .and_then(|r| r.kind)
            .ok_or_else(|| {
                error(
                    ErrorCode::Internal,
                    "a forwarded request came back without an answer",
                )
            })
    }

    /// The `list_chats` summaries of `asks` (chats of group `g`, which this node does not
    /// serve, with the user's read markers) from a node that does.
    pub(super) async fn summaries_elsewhere(
        &self,
        g: GroupId,
        user: UserId,
        asks: &[SyncAsk],
    ) -> Result<Vec<v1::ChatSummary>, v1::Error> {
        let part = SyncPart {
            summaries: true,
            ..sync_part_of(asks)
        };
        Ok(send_sync_part(&self.node, g, user, part).await?.summaries)
    }

    /// Answers a [`SyncPart`] for `user` from this node's replica of group `g`.
    async fn serve_sync_part(
        &self,
        g: GroupId,
        user: UserId,
        part: SyncPart,
    ) -> Result<ForwardedAnswer, v1::Error> {
        if part.chats.len() > PAGE_ITEMS_MAX as usize || part.read_seqs.len() != part.chats.len() {
            return Err(error(
                ErrorCode::BadRequest,
                "a sync part names too many chats, or not one read marker per chat",
            ));
        }
        let Some(group) = self.node.serving_group(g) else {
            return Err(self.not_served(g, &format!("group {g}")));
        };
        if let Some(stray) = part.chats.iter().find(|c| group_of(c.chat_id) != g) {
            return Err(error(
                ErrorCode::BadRequest,
                format!("chat {} of a sync part is not in group {g}", stray.chat_id),
            ));
        }
        let asks: Vec<SyncAsk> = part
            .chats
            .iter()
            .zip(&part.read_seqs)
            .map(|(c, read_seq)| SyncAsk {
                chat: c.chat_id,
                last: c.last_seq,
                read_seq: *read_seq,
            })
            .collect();
        if part.summaries {
            let summaries = asks
                .iter()
                .filter_map(|a| Self::chat_summary(&group, a.chat, user, a.read_seq))
                .collect();
            return Ok(ForwardedAnswer {
                summaries,
                ..ForwardedAnswer::default()
            });
        }
        let per_chat = u64::from(part.events_per_chat_max.clamp(1, PAGE_ITEMS_MAX));
        let budget = (part.bytes_max as usize).min(PAGE_BYTES_MAX);
        if part.no_read_barrier && part.bytes_max > 0 {
            return Err(error(
                ErrorCode::BadRequest,
                "a sync part without a read barrier carries no events (bytes_max 0)",
            ));
        }
        let (differences, used) = self
            .sync_part_here(
                &group,
                user,
                &asks,
                per_chat,
                part.all,
                budget,
                !part.no_read_barrier,
            )
            .await?;
        let joined_seqs = if part.joined_seqs {
            let st = group.shared().read();
            asks.iter()
                .map(|a| st.joined_seq(a.chat, user).unwrap_or(0))
                .collect()
        } else {
            Vec::new()
        };
        Ok(ForwardedAnswer {
            differences,
            bytes_used: used as u64,
            joined_seqs,
            ..ForwardedAnswer::default()
        })
    }

    /// Checks `me`'s session on a node serving its user's group (which this node does
    /// not), for a request answered here (bound to this connection, or a media read).
    pub(super) async fn check_session_elsewhere(&self, me: &Principal) -> Result<(), v1::Error> {
        let g = self.group_id_for(me.user_id, "user")?;
        let body = ForwardedRequest {
            user_id: me.user_id,
            session_id: me.session_id,
            ..ForwardedRequest::default()
        };
        send_forwarded(&self.node, g, &[g], body).await.map(|_| ())
    }

    /// Checks a handshake's session token here, or where its user's group is served
    /// when this node serves no replica of it (and `may_forward`).
    pub(super) async fn authenticate_token(
        &self,
        token: &str,
        may_forward: bool,
    ) -> Result<Principal, v1::Error> {
        let bad_token = || {
            error(
                ErrorCode::Unauthenticated,
                "unknown or revoked session token",
            )
        };
        let user: UserId = token
            .split_once('.')
            .and_then(|(u, _)| u.parse().ok())
            .ok_or_else(bad_token)?;
        let g = self.group_id_for(user, "user").map_err(|_| bad_token())?;
        if may_forward && self.node.serving_group(g).is_none() && self.served_elsewhere(g) {
            let body = ForwardedRequest {
                session_token: token.to_string(),
                ..ForwardedRequest::default()
            };
            let answer = send_forwarded(&self.node, g, &[g], body).await?;
            return Ok(Principal {
                user_id: answer.user_id,
                session_id: answer.session_id,
                device_id: answer.device_id.into(),
            });
        }
        // Issue 9: a repairing replica cannot tell a good token from a bad one.
        if let Some(e) = self.repairing(g, user, "user") {
            return Err(e);
        }
        let group = &self.group_for(user, "user").map_err(|_| bad_token())?;
        let st = group.shared().read();
        let session = st
            .session_by_token(user, &hash_token(token))
            .ok_or_else(bad_token)?;
        let device_id = st.session_device(user, session).unwrap_or_default();
        Ok(Principal {
            user_id: user,
            session_id: session,
            device_id: device_id.into(),
        })
    }

    /// Serves a request another node forwarded for group `g` (the receiving side).
    /// `Err` only for a body that is not a forwarded request.
    pub async fn serve_forwarded(&self, g: GroupId, body: Bytes) -> Result<Bytes, String> {
        let f = ForwardedRequest::decode(body)
            .map_err(|e| format!("a bad forwarded request for group {g}: {e}"))?;
        let answer = |result: Result<Resp, v1::Error>| {
            let kind = result.unwrap_or_else(Resp::Error);
            ForwardedAnswer {
                response: Some(v1::Response { kind: Some(kind) }),
                ..ForwardedAnswer::default()
            }
        };
        let mut answered = if !f.media_grant.is_empty() {
            self.serve_media_grant(f.user_id, &f.media_grant)
        } else if !f.bot_check.is_empty() {
            match self.serve_bot_check(g, &f.bot_check) {
                Ok(bots) => ForwardedAnswer {
                    bots,
                    ..ForwardedAnswer::default()
                },
                Err(e) => answer(Err(e)),
            }
        } else if let Some(part) = f.sync_part {
            match self.serve_sync_part(g, f.user_id, part).await {
                Ok(answered) => answered,
                Err(e) => answer(Err(e)),
            }
        } else if !f.session_token.is_empty() {
            match self.authenticate_token(&f.session_token, false).await {
                Ok(p) => ForwardedAnswer {
                    user_id: p.user_id,
                    session_id: p.session_id,
                    device_id: p.device_id.to_string(),
                    ..ForwardedAnswer::default()
                },
                Err(e) => answer(Err(e)),
            }
        } else {
            let me = Principal {
                user_id: f.user_id,
                session_id: f.session_id,
                device_id: "".into(),
            };
            match f.request.and_then(|r| r.kind) {
                Some(req) => {
                    FORWARDED_REQUESTS_SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    answer(
                        self.serve_forwarded_request(
                            me,
                            req,
                            f.session_checked,
                            f.media_read_granted,
                        )
                        .await,
                    )
                }
                // Only the session to check.
                None => match self.session_here(me).await {
                    Ok(_) => ForwardedAnswer::default(),
                    Err(e) => answer(Err(e)),
                },
            }
        };
        answered.leader = self.node.group(g).and_then(|r| r.leader()).unwrap_or(0);
        Ok(Bytes::from(answered.encode_to_vec()))
    }

    /// Which of `users` (of group `g`, served here) are bots: a `bot_check`.
    fn serve_bot_check(&self, g: GroupId, users: &[u64]) -> Result<Vec<u64>, v1::Error> {
        if users.len() > PAGE_ITEMS_MAX as usize {
            return Err(error(
                ErrorCode::BadRequest,
                format!("a bot check names more than {PAGE_ITEMS_MAX} users"),
            ));
        }
        let Some(group) = self.node.serving_group(g) else {
            return Err(self.not_served(g, &format!("group {g}")));
        };
        let st = group.shared().read();
        Ok(users
            .iter()
            .copied()
            .filter(|u| group_of(*u) == g && st.bots().get(*u).is_some())
            .collect())
    }

    /// `me` if its session is live in this node's replica of its user's group.
    async fn session_here(&self, me: Principal) -> Result<Principal, v1::Error> {
        let g = self.group_id_for(me.user_id, "user")?;
        let Some(group) = self.node.serving_group(g) else {
            return Err(self.not_served(g, &format!("user {}", me.user_id)));
        };
        self.check_session(&group, me).await
    }

    async fn serve_forwarded_request(
        &self,
        me: Principal,
        req: Req,
        checked: bool,
        media_read_granted: bool,
    ) -> Result<Resp, v1::Error> {
        let media_read = matches!(req, Req::MediaDownload(_) | Req::MediaInfo(_));
        if !(Self::forwardable(&req) || media_read && checked) {
            return Err(error(
                ErrorCode::BadRequest,
                "this request is not answered for another node",
            ));
        }
        let me = if checked {
            me
        } else {
            self.session_here(me).await?
        };
        if media_read {
            // From what this node stores, never forwarded again (`media_forward.rs`).
            return self.media.handle(me.user_id, req, media_read_granted).await;
        }
        let conn = ConnCtx::detached(me.clone());
        Box::pin(self.dispatch_authenticated(&conn, 0, me, req)).await
    }
}
/// Sends `body` to a node serving group `g` (preferring one that serves every group
/// in `needed`, then the placement's order), trying the next when one cannot take it.
/// An answer that carries an error (the request refused there) is that error.
pub(super) async fn send_forwarded(
    node: &Node,
    g: GroupId,
    needed: &[GroupId],
    body: ForwardedRequest,
) -> Result<ForwardedAnswer, v1::Error> {
    let body = Bytes::from(body.encode_to_vec());
    let mut last = format!("no other node serves group {g}");
    for target in node.forward_targets(g, needed) {
        match send_once(node, target, g, body.clone()).await {
            Sent::Answered(answer) => return answer,
            Sent::NotSent(detail) => last = detail,
        }
    }
    Err(unavailable_retry(format!(
        "no node serving group {g} took the request: {last}"
    )))
}

/// What became of one forwarded request.
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per forwarded request, matched at once"
)]
pub(super) enum Sent {
    /// The target answered (a refusal it answered is the `Err`), or took the request and
    /// gave no answer in time (a `TIMEOUT` error: it may have been done).
    Answered(Result<ForwardedAnswer, v1::Error>),
    /// The target did not take it (unreachable, or not serving the frame's group): why.
    NotSent(String),
}

/// Sends an encoded [`ForwardedRequest`] for group `g` (which `target` must host) to
/// `target`.
pub(super) async fn send_once(node: &Node, target: u64, g: GroupId, body: Bytes) -> Sent {
    let Some(router) = node.router() else {
        return Sent::NotSent(format!("group {g} is not on this node"));
    };
    match router
        .client_request(target, g, body, FORWARD_TIMEOUT)
        .await
    {
        Ok(bytes) => Sent::Answered(match ForwardedAnswer::decode(bytes) {
            Err(e) => Err(error(
                ErrorCode::Internal,
                format!("node {target} answered a forwarded request badly: {e}"),
            )),
            Ok(mut answer) => {
                node.note_leader(g, answer.leader);
                match answer.response.take() {
                    Some(v1::Response {
                        kind: Some(Resp::Error(e)),
                    }) => Err(e),
                    response => {
                        answer.response = response;
                        Ok(answer)
                    }
                }
            }
        }),
        Err(ForwardError::NotSent(detail)) => Sent::NotSent(format!("node {target}: {detail}")),
        Err(ForwardError::Unknown(detail)) => Sent::Answered(Err(error(
            ErrorCode::Timeout,
            format!("forwarded to node {target}, no answer ({detail}): it may have been done"),
        ))),
    }
}

/// The part of `user`'s sync in group `g` from a node serving it: `asks` (chats of `g`,
/// with positions and read markers), within `budget` bytes of events. The asking node
/// checked the session.
pub(super) async fn ask_sync_part(
    node: &Node,
    g: GroupId,
    user: UserId,
    asks: &[SyncAsk],
    per_chat: u64,
    all: bool,
    budget: usize,
) -> Result<(Vec<v1::ChatDifference>, usize), v1::Error> {
    let part = SyncPart {
        events_per_chat_max: per_chat as u32,
        all,
        bytes_max: budget as u64,
        ..sync_part_of(asks)
    };
    let answer = send_sync_part(node, g, user, part).await?;
    Ok((answer.differences, (answer.bytes_used as usize).min(budget)))
}

/// The head of `chat` (of group `g`, not served here) from a replica: after a read
/// barrier there with `barrier`, otherwise from its applied state
/// (`SyncPart.no_read_barrier`: at most a few milliseconds behind); `None` when `user`
/// is not a member.
async fn ask_head(
    node: &Node,
    g: GroupId,
    user: UserId,
    chat: u64,
    barrier: bool,
) -> Result<Option<u64>, v1::Error> {
    let asks = [SyncAsk {
        chat,
        last: 0,
        read_seq: 0,
    }];
    let part = SyncPart {
        events_per_chat_max: 1,
        all: true,
        bytes_max: 0,
        no_read_barrier: !barrier,
        ..sync_part_of(&asks)
    };
    let answer = send_sync_part(node, g, user, part).await?;
    let d = answer
        .differences
        .into_iter()
        .find(|d| d.chat_id == chat)
        .ok_or_else(|| error(ErrorCode::Internal, "a sync part without the chat"))?;
    Ok((!d.not_member).then_some(d.head_seq))
}

/// A [`SyncPart`] of `asks`: the chats with the device's positions and the read markers.
pub(crate) fn sync_part_of(asks: &[SyncAsk]) -> SyncPart {
    SyncPart {
        chats: asks
            .iter()
            .map(|a| v1::ChatPosition {
                chat_id: a.chat,
                last_seq: a.last,
            })
            .collect(),
        read_seqs: asks.iter().map(|a| a.read_seq).collect(),
        ..SyncPart::default()
    }
}

/// Which of `users` (all of group `g`, at most `PAGE_ITEMS_MAX`) are bots, from a node
/// serving `g`.
pub(crate) async fn bots_among(
    node: &Node,
    g: GroupId,
    users: Vec<u64>,
) -> Result<Vec<u64>, v1::Error> {
    let body = ForwardedRequest {
        bot_check: users,
        ..ForwardedRequest::default()
    };
    Ok(send_forwarded(node, g, &[g], body).await?.bots)
}

/// Sends `part` of `user`'s request to a node serving group `g`.
pub(crate) async fn send_sync_part(
    node: &Node,
    g: GroupId,
    user: UserId,
    part: SyncPart,
) -> Result<ForwardedAnswer, v1::Error> {
    let body = ForwardedRequest {
        user_id: user,
        sync_part: Some(part),
        ..ForwardedRequest::default()
    };
    send_forwarded(node, g, &[g], body).await
}
