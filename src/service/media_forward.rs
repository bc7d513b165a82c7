//! Media downloads and infos on any node of a cluster.
//!
//! What it owns: answering `media_download` and `media_info` on a node that cannot alone:
//! the file is stored only by the replicas of the group that recorded its upload (the
//! uploader's user group, `crate::media`), and who may read it is recorded there (an
//! uploader) and in the group of every chat it was sent to (a member). A node that lacks
//! the file, or whose replicas do not let the caller read it, asks every other node what
//! its replicas know (a `ForwardedRequest` with `media_grant`: readable by the user?
//! which group stores it?), then sends the request to a replica of the storing group
//! with `media_read_granted` when some node let the user read it. The receiver serves
//! what it stores without checking again and never forwards.
//!
//! What it must not do: widen the read rule (a node grants only from its own replicas'
//! records, as a local read does), forward the read of a file whose storing group this
//! node serves (it fetches a copy it lacks from the group's other replicas itself,
//! checking it: `crate::media::fetch`; its answer stands, only a grant may come from
//! elsewhere), or forward an upload (an upload goes whole to a replica of the uploader's
//! group: `forward.rs`).
//!
//! Costs: a read the connected node can answer costs nothing more. Otherwise a request
//! costs one round of grant questions to the other nodes, in parallel (unless this node
//! both lets the caller read and knows the storing group), and one forwarded request,
//! whose answer carries the chunk. A download's next chunks within [`GRANT_TTL`] skip
//! the questions: the grant and the storing group are remembered (bounded,
//! [`GRANTS_MAX`]). So a member removed from the chat may go on downloading through such
//! a node for up to [`GRANT_TTL`], where a node that checks the grant itself stops at
//! once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_raft::GroupId;
use chatlog_raft::chat::UserId;
use chatlog_wire::limits::MEDIA_SHA256_BYTES;
use chatlog_wire::proto::node::v1::{ForwardedAnswer, ForwardedRequest};
use chatlog_wire::proto::v1::{self, ErrorCode, request::Kind as Req, response::Kind as Resp};
use prost::Message;

use super::ChatService;
use super::forward::{Sent, send_once};
use crate::http::CountedService;
use crate::service::convert::error;

/// How long a read another node granted is remembered. Why: a download asks for its
/// chunks back to back (each 512 KiB); a few seconds spare every chunk but the first the
/// round of questions, and bound how long a revoked grant still works through a node
/// that cannot check it itself.
pub const GRANT_TTL: Duration = Duration::from_secs(5);
/// Most grants remembered per node; beyond, the expired ones are dropped, then all. Why:
/// an entry is ~64 bytes, and a node serves at most a few thousand downloads at once.
pub const GRANTS_MAX: usize = 4096;

/// Reads other nodes granted lately: (user, media id) → when it expires and the group
/// that stores the file.
#[derive(Debug, Default)]
pub(super) struct Grants(Mutex<HashMap<GrantKey, (Instant, GroupId)>>);

type GrantKey = (UserId, [u8; MEDIA_SHA256_BYTES]);

impl Grants {
    fn get(&self, user: UserId, sha256: &[u8; MEDIA_SHA256_BYTES]) -> Option<GroupId> {
        let map = self.0.lock().expect("grants lock");
        map.get(&(user, *sha256))
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, g)| *g)
    }

    fn put(&self, user: UserId, sha256: &[u8; MEDIA_SHA256_BYTES], g: GroupId) {
        let mut map = self.0.lock().expect("grants lock");
        let now = Instant::now();
        if map.len() >= GRANTS_MAX {
            map.retain(|_, (expires, _)| *expires > now);
            if map.len() >= GRANTS_MAX {
                map.clear();
            }
        }
        // A live entry keeps its expiry: reads do not prolong the grant they used.
        map.entry((user, *sha256))
            .and_modify(|e| {
                if e.0 <= now {
                    *e = (now + GRANT_TTL, g);
                }
            })
            .or_insert((now + GRANT_TTL, g));
    }

    fn forget(&self, user: UserId, sha256: &[u8; MEDIA_SHA256_BYTES]) {
        self.0.lock().expect("grants lock").remove(&(user, *sha256));
    }
}

impl ChatService {
    /// Answers a `media_download` or `media_info` of `user` (whose session was checked):
    /// here when this node can, otherwise from a node storing the file (module docs).
    pub(super) async fn media_read(&self, user: UserId, req: Req) -> Result<Resp, v1::Error> {
        let sha = match &req {
            Req::MediaDownload(r) => r.sha256.clone(),
            Req::MediaInfo(r) => r.sha256.clone(),
            other => {
                return Err(error(
                    ErrorCode::Internal,
                    format!("not a media read: {other:?}"),
                ));
            }
        };
        let mut refused = match self.media.handle(user, req.clone(), false).await {
            Ok(answer) => return Ok(answer),
            Err(e) => e,
        };
        let another_node_may_answer = matches!(
            ErrorCode::try_from(refused.code),
            Ok(ErrorCode::NotFound | ErrorCode::PermissionDenied | ErrorCode::Unavailable)
        );
        let Ok(sha256) = <[u8; MEDIA_SHA256_BYTES]>::try_from(&sha[..]) else {
            return Err(refused);
        };
        let others = self.other_nodes();
        if !another_node_may_answer || others.is_empty() {
            return Err(refused);
        }
        let (mut readable, holder) = self.media.grant(user, &sha256);
        // A replica of the storing group gets a file it lacks from the group's other
        // replicas itself, checking it (`crate::media::fetch`); its answer stands.
        let storing_here = holder.is_some_and(|g| self.node.serving_group(g).is_some());
        if storing_here && ErrorCode::try_from(refused.code) != Ok(ErrorCode::PermissionDenied) {
            return Err(refused);
        }
        let mut holders: Vec<GroupId> = holder.into_iter().collect();
        let remembered = self.media_grants.get(user, &sha256);
        if let Some(g) = remembered {
            readable = true;
            if !holders.contains(&g) {
                holders.push(g);
            }
        } else if !readable || holders.is_empty() {
            for (r, g) in self.media_grants_elsewhere(user, &sha256, others).await {
                readable |= r;
                if let Some(g) = g
                    && !holders.contains(&g)
                {
                    holders.push(g);
                }
            }
        }
        if !readable {
            if !holders.is_empty() && ErrorCode::try_from(refused.code) == Ok(ErrorCode::NotFound) {
                return Err(error(
                    ErrorCode::PermissionDenied,
                    format!(
                        "user {user} may not read media {}: neither its uploader nor a \
                         member of a chat it was sent to",
                        crate::media::store::hex(&sha256)
                    ),
                ));
            }
            return Err(refused);
        }
        // Refused here only for want of the grant another node gave: this node may store
        // the file itself.
        if ErrorCode::try_from(refused.code) == Ok(ErrorCode::PermissionDenied) {
            match self.media.handle(user, req.clone(), true).await {
                Ok(answer) => {
                    if let Some(g) = holder {
                        self.media_grants.put(user, &sha256, g);
                    }
                    return Ok(answer);
                }
                Err(e) => refused = e,
            }
        }
        if holders.is_empty() || storing_here {
            return Err(refused);
        }
        let body = Bytes::from(
            ForwardedRequest {
                user_id: user,
                request: Some(v1::Request { kind: Some(req) }),
                session_checked: true,
                media_read_granted: true,
                ..ForwardedRequest::default()
            }
            .encode_to_vec(),
        );
        let me = self.node.node_id();
        let mut last = refused;
        for g in holders {
            let replicas: Vec<u64> = self.node.placement().replicas(g).to_vec();
            for target in replicas.into_iter().filter(|n| *n != me) {
                match send_once(&self.node, target, g, body.clone()).await {
                    Sent::Answered(Ok(answer)) => {
                        self.media_grants.put(user, &sha256, g);
                        return answer.response.and_then(|r| r.kind).ok_or_else(|| {
                            error(
                                ErrorCode::Internal,
                                "a forwarded media read came back without an answer",
                            )
                        });
                    }
                    // A replica that missed the file (it is fetching it), lost it or holds
                    // a damaged copy (its check refused it): the next may serve it.
                    Sent::Answered(Err(e))
                        if matches!(
                            ErrorCode::try_from(e.code),
                            Ok(ErrorCode::Unavailable | ErrorCode::NotFound | ErrorCode::Internal)
                        ) =>
                    {
                        last = e
                    }
                    Sent::Answered(Err(e)) => return Err(e),
                    Sent::NotSent(detail) => {
                        last = crate::service::convert::unavailable_retry(format!(
                            "media {} is stored by group {g}, whose replicas did not \
                             answer: {detail}",
                            crate::media::store::hex(&sha256)
                        ))
                    }
                }
            }
        }
        self.media_grants.forget(user, &sha256);
        Err(last)
    }

    /// The reference of media `sha256` when `user` may read it, from this node or another
    /// (a `media_info` through [`ChatService::media_read`]).
    pub(super) async fn media_ref_anywhere(
        &self,
        user: UserId,
        sha256: &[u8; MEDIA_SHA256_BYTES],
    ) -> Result<v1::MediaRef, v1::Error> {
        let info = Req::MediaInfo(v1::MediaInfoRequest {
            sha256: Bytes::copy_from_slice(sha256),
        });
        match Box::pin(self.media_read(user, info)).await? {
            Resp::MediaInfo(v1::MediaInfoResponse { media: Some(m) }) => Ok(m),
            other => Err(error(
                ErrorCode::Internal,
                format!("a media info answered {other:?}"),
            )),
        }
    }

    /// Checks the media of a message about to be sent: stored (on some node), of the size
    /// stated, and readable by the sender (so sending it cannot leak a file the sender
    /// never had).
    pub(super) async fn check_media_send(
        &self,
        user: UserId,
        media: &chatlog_raft::chat::MediaRef,
    ) -> Result<(), v1::Error> {
        let r = self.media_ref_anywhere(user, &media.sha256).await?;
        if r.size_bytes != media.size_bytes {
            return Err(error(
                ErrorCode::BadRequest,
                format!(
                    "media {} has {} bytes, not {}",
                    crate::media::store::hex(&media.sha256),
                    r.size_bytes,
                    media.size_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Every other member node of the cluster, each with a group it hosts (a forwarded
    /// request is addressed to a group its receiver hosts).
    fn other_nodes(&self) -> Vec<(u64, GroupId)> {
        let me = self.node.node_id();
        let placement = self.node.placement();
        placement
            .members
            .keys()
            .filter(|n| **n != me)
            .filter_map(|n| {
                placement
                    .groups
                    .iter()
                    .find(|(_, p)| p.replicas.contains(n))
                    .map(|(g, _)| (*n, *g))
            })
            .collect()
    }

    /// What the replicas of `others` ([`ChatService::other_nodes`]) know of media
    /// `sha256` for `user` ([`crate::media::Media::grant`]), asked of all of them at once;
    /// a node that does not answer knows nothing.
    async fn media_grants_elsewhere(
        &self,
        user: UserId,
        sha256: &[u8; MEDIA_SHA256_BYTES],
        others: Vec<(u64, GroupId)>,
    ) -> Vec<(bool, Option<GroupId>)> {
        let body = Bytes::from(
            ForwardedRequest {
                user_id: user,
                media_grant: Bytes::copy_from_slice(sha256),
                ..ForwardedRequest::default()
            }
            .encode_to_vec(),
        );
        let asks = others.into_iter().map(|(target, g)| {
            let body = body.clone();
            async move {
                match send_once(&self.node, target, g, body).await {
                    Sent::Answered(Ok(a)) => (
                        a.media_readable,
                        (a.media_group > 0).then_some(a.media_group),
                    ),
                    _ => (false, None),
                }
            }
        });
        futures_util::future::join_all(asks).await
    }

    /// The answer to a `media_grant` (the receiving side): what this node's replicas know.
    pub(super) fn serve_media_grant(&self, user: UserId, sha256: &[u8]) -> ForwardedAnswer {
        let Ok(sha256) = <[u8; MEDIA_SHA256_BYTES]>::try_from(sha256) else {
            return ForwardedAnswer {
                response: Some(v1::Response {
                    kind: Some(Resp::Error(error(
                        ErrorCode::BadRequest,
                        format!("a media id is 32 bytes, not {}", sha256.len()),
                    ))),
                }),
                ..ForwardedAnswer::default()
            };
        };
        let (readable, group) = self.media.grant(user, &sha256);
        ForwardedAnswer {
            media_readable: readable,
            media_group: group.unwrap_or(0),
            ..ForwardedAnswer::default()
        }
    }
}

/// The bot API's way to media (`crate::bot::MediaResolver`), bound to the node's chat
/// service once it started (the bot API starts first, with the HTTP port): a media id a
/// bot sends is resolved like a client's, on this node or another.
#[derive(Debug, Default)]
pub struct MediaLink(std::sync::OnceLock<std::sync::Weak<CountedService<ChatService>>>);

impl MediaLink {
    /// Binds the node's chat service (once; later calls change nothing).
    pub fn set(&self, service: &std::sync::Arc<CountedService<ChatService>>) {
        let _ = self.0.set(std::sync::Arc::downgrade(service));
    }
}

impl crate::bot::MediaResolver for MediaLink {
    fn resolve_media<'a>(&'a self, user: UserId, media_id: &'a str) -> crate::bot::MediaFuture<'a> {
        Box::pin(async move {
            let service = self
                .0
                .get()
                .and_then(std::sync::Weak::upgrade)
                .ok_or_else(|| {
                    crate::bot::BotError::new(503, "media is not ready on this node yet")
                })?;
            let r = service.inner().media_ref(user, media_id).await?;
            Ok(crate::service::convert::media_from_proto(r)?)
        })
    }
}
