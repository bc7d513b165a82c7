//! Media parts between the replicas of the uploader's group.
//!
//! What it owns: in a cluster, sending each part to the other replicas of the uploader's
//! group over the node transport (`media_request` frames) and acknowledging it only once
//! a majority of those replicas hold it durably (this node counts when it is one; its own
//! write must succeed either way, so its status stays true); telling the others when an
//! upload finished, so each finishes its own copy (checking the hash itself); serving
//! those requests from peers ([`MediaDirectory`]); and the bytes of both messages. What
//! it must not do: decide who may read what or propose anything to Raft (the node that
//! finishes proposes `MediaStored` once; peers only store bytes).
//!
//! A replica that missed parts (it was down) keeps its partial copy when told of the
//! finish and fetches the parts it lacks from the others (`fetch.rs`, which also sends
//! and answers the `fetch` request below).
//!
//! Request bytes (little-endian; `str` is a u32 length then UTF-8):
//!
//! ```text
//! part:   kind u8 = 1 | upload_id u64 | uploader u64 | size u64 | part_bytes u32
//!         | created_ms u64 | mime str | file name str | part u32 | crc32 u32 | data (rest)
//! finish: kind u8 = 2 | upload_id u64 | uploader u64 | sha256 [32]
//! fetch:  kind u8 = 3 | sha256 [32] | part u32     (answered as `fetch.rs` describes)
//! answer: status u8 (0 stored, 1 bad request, 2 conflict, 3 resource exhausted,
//!         4 not found, 5 failed) | parts held u32 | message str
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chatlog_raft::chat::group_of;
use chatlog_raft::node::Node;
use chatlog_raft::{ChatRaft, GroupDirectory, GroupId};
use chatlog_wire::limits::{MEDIA_FILE_NAME_BYTES_MAX, MEDIA_MIME_TYPE_BYTES_MAX};
use chatlog_wire::proto::v1::{self, ErrorCode};
use tokio::task::JoinHandle;

use super::Media;
use super::store::{Header, MediaError};
use crate::service::convert::error;

/// How long a replica may take to store a part or finish an upload before the sender
/// counts it as failed: a part is one 512 KiB write and one fdatasync, a finish one hash
/// pass over up to 4 GiB.
pub const PEER_MEDIA_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest message in an answer, in bytes.
const ANSWER_MESSAGE_BYTES_MAX: usize = 4096;

const KIND_PART: u8 = 1;
const KIND_FINISH: u8 = 2;
/// A part of a finished file (`fetch.rs` sends it and encodes its answer).
pub(super) const KIND_FETCH: u8 = 3;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a file's description (the `part` layout's fields after `kind`, up to the
/// file name; `fetch.rs` answers with the same bytes).
pub(super) fn put_header(out: &mut Vec<u8>, h: &Header) {
    out.extend_from_slice(&h.upload_id.to_le_bytes());
    out.extend_from_slice(&h.uploader.to_le_bytes());
    out.extend_from_slice(&h.size.to_le_bytes());
    out.extend_from_slice(&h.part_bytes.to_le_bytes());
    out.extend_from_slice(&h.created_ms.to_le_bytes());
    put_str(out, &h.mime_type);
    put_str(out, &h.file_name);
}

/// Reads what [`put_header`] wrote.
pub(super) fn read_header(r: &mut Reader<'_>) -> Result<Header, String> {
    Ok(Header {
        upload_id: r.u64()?,
        uploader: r.u64()?,
        size: r.u64()?,
        part_bytes: r.u32()?,
        created_ms: r.u64()?,
        mime_type: r.str(MEDIA_MIME_TYPE_BYTES_MAX)?,
        file_name: r.str(MEDIA_FILE_NAME_BYTES_MAX)?,
    })
}

fn encode_part(h: &Header, part: u32, crc32: u32, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(64 + h.mime_type.len() + h.file_name.len() + data.len());
    out.push(KIND_PART);
    put_header(&mut out, h);
    out.extend_from_slice(&part.to_le_bytes());
    out.extend_from_slice(&crc32.to_le_bytes());
    out.extend_from_slice(data);
    Bytes::from(out)
}

fn encode_finish(h: &Header, sha256: &[u8; 32]) -> Bytes {
    let mut out = Vec::with_capacity(49);
    out.push(KIND_FINISH);
    out.extend_from_slice(&h.upload_id.to_le_bytes());
    out.extend_from_slice(&h.uploader.to_le_bytes());
    out.extend_from_slice(sha256);
    Bytes::from(out)
}

/// A checked reader over a request's bytes.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("media request cut short: {n} bytes needed"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub(super) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub(super) fn str(&mut self, max: u32) -> Result<String, String> {
        let n = self.u32()?;
        if n > max {
            return Err(format!("string of {n} bytes in a media request"));
        }
        String::from_utf8(self.take(n as usize)?.to_vec())
            .map_err(|_| "string in a media request is not UTF-8".into())
    }
}

enum Request {
    Part {
        header: Header,
        part: u32,
        crc32: u32,
        data: Bytes,
    },
    Finish {
        upload_id: u64,
        uploader: u64,
        sha256: [u8; 32],
    },
    /// A part of a finished file, for a replica that misses it (`fetch.rs`).
    Fetch { sha256: [u8; 32], part: u32 },
}

fn decode_request(body: &Bytes) -> Result<Request, String> {
    let mut r = Reader(body);
    match r.take(1)?[0] {
        KIND_PART => {
            let header = read_header(&mut r)?;
            let part = r.u32()?;
            let crc32 = r.u32()?;
            let at = body.len() - r.0.len();
            Ok(Request::Part {
                header,
                part,
                crc32,
                data: body.slice(at..),
            })
        }
        KIND_FINISH => {
            let upload_id = r.u64()?;
            let uploader = r.u64()?;
            let sha256 = r.take(32)?.try_into().expect("32 bytes");
            if !r.0.is_empty() {
                return Err("trailing bytes after a media finish".into());
            }
            Ok(Request::Finish {
                upload_id,
                uploader,
                sha256,
            })
        }
        KIND_FETCH => {
            let sha256 = r.take(32)?.try_into().expect("32 bytes");
            let part = r.u32()?;
            if !r.0.is_empty() {
                return Err("trailing bytes after a media fetch".into());
            }
            Ok(Request::Fetch { sha256, part })
        }
        k => Err(format!("unknown media request kind {k}")),
    }
}

fn encode_answer(result: &Result<u32, MediaError>) -> Bytes {
    let (status, held, message) = match result {
        Ok(held) => (0u8, *held, String::new()),
        Err(e) => {
            let status = match e {
                MediaError::BadRequest(_) => 1,
                MediaError::Conflict(_) => 2,
                MediaError::ResourceExhausted(_) => 3,
                MediaError::NotFound(_) => 4,
                MediaError::Io { .. } | MediaError::Corrupt { .. } => 5,
            };
            let mut m = e.to_string();
            m.truncate(m.floor_char_boundary(ANSWER_MESSAGE_BYTES_MAX));
            (status, 0, m)
        }
    };
    let mut out = Vec::with_capacity(9 + message.len());
    out.push(status);
    out.extend_from_slice(&held.to_le_bytes());
    put_str(&mut out, &message);
    Bytes::from(out)
}

/// A peer's answer as the protocol error it stands for.
fn decode_answer(node: u64, body: &[u8]) -> Result<u32, v1::Error> {
    let mut r = Reader(body);
    let parsed = (|| {
        let status = r.take(1)?[0];
        let held = r.u32()?;
        let message = r.str(ANSWER_MESSAGE_BYTES_MAX as u32)?;
        Ok::<_, String>((status, held, message))
    })();
    let (status, held, message) = parsed.map_err(|e| {
        error(
            ErrorCode::Unavailable,
            format!("node {node} answered a media part with {e}"),
        )
    })?;
    let code = match status {
        0 => return Ok(held),
        1 => ErrorCode::BadRequest,
        2 => ErrorCode::Conflict,
        3 => ErrorCode::ResourceExhausted,
        4 => ErrorCode::NotFound,
        _ => ErrorCode::Unavailable,
    };
    Err(error(code, format!("node {node}: {message}")))
}

/// The replicas of `group` as the placement this node follows has them (a replica move
/// changes them), or the static ones before that placement is known.
fn replicas(node: &Node, group: GroupId) -> Vec<u64> {
    let now = node.replicas_of(group);
    if now.is_empty() {
        node.config().placement(group)
    } else {
        now
    }
}

fn task_failed(e: tokio::task::JoinError) -> v1::Error {
    error(ErrorCode::Internal, format!("media part task failed: {e}"))
}

/// Sends parts and finishes to peer replicas.
#[derive(Debug, Default)]
pub struct Replicator {}

impl Replicator {
    /// A replicator (stateless: the node tells it where the replicas are).
    pub fn new() -> Replicator {
        Replicator {}
    }

    /// Waits for the local write of a part (`local`) and for copies on the other
    /// replicas of the uploader's group until a majority of the group's replicas hold
    /// it; returns the parts this node holds.
    pub async fn replicate_part(
        &self,
        node: &Node,
        header: &Header,
        part: u32,
        crc32: u32,
        data: Bytes,
        local: JoinHandle<Result<u32, v1::Error>>,
    ) -> Result<u32, v1::Error> {
        let group = group_of(header.uploader);
        let me = node.node_id();
        let placement = replicas(node, group);
        let peers: Vec<u64> = placement.iter().copied().filter(|n| *n != me).collect();
        let Some(router) = node.router().filter(|_| !peers.is_empty()) else {
            return local.await.map_err(task_failed)?;
        };
        let body = encode_part(header, part, crc32, &data);
        let (tx, mut rx) = tokio::sync::mpsc::channel(peers.len().max(1));
        for peer in &peers {
            let (router, body, tx, peer) = (router.clone(), body.clone(), tx.clone(), *peer);
            // Detached: a slow replica finishes its copy after the majority answered.
            tokio::spawn(async move {
                let answer = match router.media(peer, group, body, PEER_MEDIA_TIMEOUT).await {
                    Ok(b) => decode_answer(peer, &b),
                    Err(e) => Err(error(
                        ErrorCode::Unavailable,
                        format!("node {peer} did not store the part: {e}"),
                    )),
                };
                let _ = tx.send(answer).await;
            });
        }
        drop(tx);
        let held = local.await.map_err(task_failed)??;
        let needed = placement.len() / 2 + 1;
        let mut acks = usize::from(placement.contains(&me));
        let mut failures = Vec::new();
        while acks < needed {
            match rx.recv().await {
                Some(Ok(_)) => acks += 1,
                Some(Err(e)) => failures.push(e),
                None => {
                    // Not enough replicas: the most telling refusal (a full disk, a bad
                    // part) wins over plain unavailability.
                    let worst = failures
                        .iter()
                        .find(|e| e.code() != ErrorCode::Unavailable)
                        .cloned();
                    return Err(worst.unwrap_or_else(|| {
                        let mut e = error(
                            ErrorCode::Unavailable,
                            format!(
                                "part {part} is durable on {acks} of {} replicas of group \
                                 {group}, {needed} needed: {}",
                                placement.len(),
                                failures
                                    .iter()
                                    .map(|e| e.message.clone())
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            ),
                        );
                        e.retry_after_ms = 500;
                        e
                    }));
                }
            }
        }
        Ok(held)
    }

    /// Tells the other replicas that the upload finished as `sha256`, and waits (bounded)
    /// for their answers, so a download from any of them right after finds the file.
    pub async fn finish(&self, node: &Node, header: &Header, sha256: [u8; 32]) {
        let group = group_of(header.uploader);
        let me = node.node_id();
        let Some(router) = node.router() else { return };
        let body = encode_finish(header, &sha256);
        let sends = replicas(node, group)
            .into_iter()
            .filter(|n| *n != me)
            .map(|peer| {
                let (router, body) = (router.clone(), body.clone());
                tokio::spawn(async move {
                    if let Err(e) = router.media(peer, group, body, PEER_MEDIA_TIMEOUT).await {
                        tracing::warn!(peer, error = %e, "a replica did not finish a media upload");
                    }
                })
            })
            .collect::<Vec<_>>();
        for s in sends {
            let _ = s.await;
        }
    }
}

/// The node's [`GroupDirectory`] for its peer server, with media requests served by
/// this node's media side (set once the service exists).
pub struct MediaDirectory {
    inner: Arc<dyn GroupDirectory>,
    media: OnceLock<Arc<Media>>,
}

impl std::fmt::Debug for MediaDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaDirectory").finish_non_exhaustive()
    }
}

impl MediaDirectory {
    /// Wraps the node's group directory.
    pub fn new(inner: Arc<dyn GroupDirectory>) -> MediaDirectory {
        MediaDirectory {
            inner,
            media: OnceLock::new(),
        }
    }

    /// Serves media requests with `media` from now on.
    pub fn set_media(&self, media: Arc<Media>) {
        let _ = self.media.set(media);
    }
}

impl GroupDirectory for MediaDirectory {
    fn raft(&self, group: GroupId) -> Option<ChatRaft> {
        self.inner.raft(group)
    }

    // Issue 9: a damaged replica's vote refusal must reach the peer server.
    fn vote_refusal(&self, group: GroupId) -> Option<String> {
        self.inner.vote_refusal(group)
    }

    // Issue 9 (session 7): a vote-unknown replica's refusal of appends likewise.
    fn append_refusal(&self, group: GroupId) -> Option<String> {
        self.inner.append_refusal(group)
    }

    fn propose(
        &self,
        group: GroupId,
        raft: ChatRaft,
        commands: Vec<chatlog_raft::chat::Command>,
    ) -> BoxFuture<(Vec<chatlog_raft::network::codec::ProposeResult>, u64)> {
        self.inner.propose(group, raft, commands)
    }

    fn media(&self, group: GroupId, body: Bytes) -> BoxFuture<Result<Bytes, String>> {
        let Some(media) = self.media.get().cloned() else {
            return Box::pin(async { Err("this node's media side is starting".to_string()) });
        };
        Box::pin(async move { media.serve_peer(group, body).await })
    }
}

impl Media {
    /// Serves a part, finish or fetch from another replica of `group`.
    async fn serve_peer(&self, group: GroupId, body: Bytes) -> Result<Bytes, String> {
        let request = decode_request(&body)?;
        let store = self.store().await.map_err(|e| e.message)?;
        let result = match request {
            Request::Fetch { sha256, part } => {
                return Ok(super::fetch::serve_part(store, sha256, part).await);
            }
            Request::Part {
                header,
                part,
                crc32,
                data,
            } => {
                if group_of(header.uploader) != group {
                    return Err(format!(
                        "a part of user {}'s upload sent as group {group}",
                        header.uploader
                    ));
                }
                tokio::task::spawn_blocking(move || {
                    let upload = store.upload_or_create(header)?;
                    let held = store.write_part_bytes(&upload, part, crc32, &data)?;
                    // Hashed after the answer, off its path (`MediaStore::hash_ahead`).
                    drop(tokio::task::spawn_blocking(move || {
                        store.hash_ahead(&upload)
                    }));
                    Ok(held)
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Request::Finish {
                upload_id,
                uploader,
                sha256,
            } => {
                let Some(upload) = store.upload(uploader, upload_id) else {
                    return Ok(encode_answer(&Err(MediaError::NotFound(format!(
                        "no upload {upload_id:016x} here"
                    )))));
                };
                let guard_of = Arc::clone(&upload);
                let _finishing = guard_of.finishing().await;
                if !upload.missing().is_empty() {
                    // This replica was down for some parts: it fetches them from the
                    // others (which hold the finished file), keeping those it has.
                    self.fetch_in_background(sha256, group, Some(upload_id));
                    Err(MediaError::NotFound(format!(
                        "upload {upload_id:016x} missed parts here; fetching them from the \
                         other replicas"
                    )))
                } else {
                    tokio::task::spawn_blocking(move || store.finish(&upload, &sha256).map(|_| 0))
                        .await
                        .map_err(|e| e.to_string())?
                }
            }
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "refused a media request from a peer");
        }
        Ok(encode_answer(&result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_and_cut_ones_are_refused() {
        let h = Header {
            upload_id: 9,
            uploader: 65_537,
            size: 1000,
            part_bytes: 512 * 1024,
            created_ms: 77,
            mime_type: "image/png".into(),
            file_name: "a.png".into(),
        };
        let body = encode_part(&h, 0, 5, b"abc");
        match decode_request(&body) {
            Ok(Request::Part {
                header,
                part,
                crc32,
                data,
            }) => {
                assert_eq!(
                    (header, part, crc32, &data[..]),
                    (h.clone(), 0, 5, &b"abc"[..])
                );
            }
            _ => panic!("a part decodes as a part"),
        }
        let fin = encode_finish(&h, &[4; 32]);
        assert!(matches!(
            decode_request(&fin),
            Ok(Request::Finish { upload_id: 9, uploader: 65_537, sha256 }) if sha256 == [4; 32]
        ));
        for len in 0..fin.len() {
            assert!(
                decode_request(&fin.slice(..len)).is_err(),
                "finish cut at {len}"
            );
        }
        for len in 0..body.len() - 3 {
            assert!(
                decode_request(&body.slice(..len)).is_err(),
                "part cut at {len}"
            );
        }
        assert_eq!(decode_answer(2, &encode_answer(&Ok(7))).ok(), Some(7));
        let e = decode_answer(
            2,
            &encode_answer(&Err(MediaError::ResourceExhausted("full".into()))),
        )
        .expect_err("refused");
        assert_eq!(e.code(), ErrorCode::ResourceExhausted);
        assert!(decode_answer(2, &[0, 1]).is_err());
    }
}
