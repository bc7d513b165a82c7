//! Media: what the `media_*` requests mean, and who may read a media id.
//!
//! What it owns: answering `media_upload_start`, `_part`, `_status`, `_finish`,
//! `media_download` and `media_info` over the node's [`store::MediaStore`]; recording a
//! finished upload in the uploader's group (`Command::MediaStored`, through Raft); the
//! read rule — a media id is readable by its uploaders and by the members of every chat a
//! message carrying it was sent to (the grants `chat/media.rs` records when such a post
//! is applied), from this node's replicas ([`Media::grant`]: the chat service asks other
//! nodes for theirs, `service/media_forward.rs`, which also checks a message's media
//! before it is sent and resolves the media ids bots send); the expiry task; and,
//! in a cluster, sending each part to the other replicas of the uploader's group before
//! acknowledging it (`replicate.rs`). What it must not do: frame bytes or manage
//! connections (the gateway does), or put media bytes into the Raft log.
//!
//! A node answers only from files it stores. In a cluster, parts reach a majority of
//! the uploader's group's replicas before they are acknowledged, and finishing on one
//! node tells the others to finish their copies. A replica of the uploader's group that
//! missed the file (it was down, or a move added it later) fetches it from the others
//! (`fetch.rs`: in the background, and at once when a download asks for it, which waits
//! a bounded time and otherwise answers `UNAVAILABLE` with a retry hint); a node outside
//! that group asked for a file it does not hold answers `UNAVAILABLE` here, and the chat
//! service asks a node that stores it (`service/media_forward.rs`), which serves it with
//! the read granted (`handle`'s `read_granted`).

pub mod fetch;
pub mod replicate;
pub mod store;

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use chatlog_raft::chat::{self, Command, Outcome, UserId, group_of};
use chatlog_raft::node::Node;
use chatlog_wire::limits::{
    MEDIA_DOWNLOAD_BYTES_MAX, MEDIA_FILE_NAME_BYTES_MAX, MEDIA_MIME_TYPE_BYTES_MAX,
    MEDIA_SHA256_BYTES,
};
use chatlog_wire::proto::v1::{self, ErrorCode, request::Kind as Req, response::Kind as Resp};

use crate::service::convert::{bad, error, propose_error, refusal};
use store::{MediaError, MediaStore, StoreConfig, now_ms};

/// Shortest and longest pause between two sweeps for expired uploads.
const EXPIRY_SWEEP_MIN: Duration = Duration::from_millis(100);
const EXPIRY_SWEEP_MAX: Duration = Duration::from_secs(60);

/// The media side of one node's service.
#[derive(Debug)]
pub struct Media {
    node: Arc<Node>,
    dir: std::path::PathBuf,
    config: StoreConfig,
    /// Opened on first use (on the blocking pool), then shared.
    store: OnceLock<Arc<MediaStore>>,
    opening: tokio::sync::Mutex<()>,
    replicator: replicate::Replicator,
    /// Files this replica missed, fetched from the group's other replicas.
    fetcher: fetch::Fetcher,
    /// This media side, for tasks it spawns.
    this: Weak<Media>,
}

/// The protocol error for a store failure.
pub fn media_error(e: MediaError) -> v1::Error {
    let code = match &e {
        MediaError::BadRequest(_) => ErrorCode::BadRequest,
        MediaError::NotFound(_) => ErrorCode::NotFound,
        MediaError::Conflict(_) => ErrorCode::Conflict,
        MediaError::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
        MediaError::Io { .. } | MediaError::Corrupt { .. } => {
            tracing::error!(error = %e, "media store failure");
            ErrorCode::Internal
        }
    };
    error(code, e.to_string())
}

fn sha(bytes: &[u8]) -> Result<[u8; MEDIA_SHA256_BYTES], v1::Error> {
    bytes
        .try_into()
        .map_err(|_| bad(format!("sha256 is {} bytes, not 32", bytes.len())))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MediaError> + Send + 'static,
) -> Result<T, v1::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("media task failed: {e}")))?
        .map_err(media_error)
}

impl Media {
    /// The media side of `node`, storing under `DATA_DIR/media`. Starts the expiry task
    /// (which also opens the store, loading uploads in progress), so call it within a
    /// tokio runtime.
    pub fn start(node: Arc<Node>, config: StoreConfig) -> Arc<Media> {
        let dir = node.config().data_dir.join("media");
        let media = Arc::new_cyclic(|this| Media {
            replicator: replicate::Replicator::new(),
            node,
            dir,
            config,
            store: OnceLock::new(),
            opening: tokio::sync::Mutex::new(()),
            fetcher: fetch::Fetcher::default(),
            this: this.clone(),
        });
        tokio::spawn(expiry_task(Arc::downgrade(&media)));
        tokio::spawn(fetch::catch_up_task(Arc::downgrade(&media)));
        media
    }

    /// The store, opened on first use.
    pub async fn store(&self) -> Result<Arc<MediaStore>, v1::Error> {
        if let Some(s) = self.store.get() {
            return Ok(Arc::clone(s));
        }
        let _opening = self.opening.lock().await;
        if let Some(s) = self.store.get() {
            return Ok(Arc::clone(s));
        }
        let (dir, config) = (self.dir.clone(), self.config.clone());
        let store = Arc::new(blocking(move || MediaStore::open(&dir, config)).await?);
        let _ = self.store.set(Arc::clone(&store));
        Ok(store)
    }

    /// The node's media store after it opened, for the peer server.
    pub fn store_if_open(&self) -> Option<Arc<MediaStore>> {
        self.store.get().cloned()
    }

    /// True when `user` may read media `sha256`: an uploader of it (recorded in the
    /// user's group), or a member of a chat of a local group it was sent to.
    pub fn may_read(&self, user: UserId, sha256: &[u8; MEDIA_SHA256_BYTES]) -> bool {
        if let Some(g) = self.node.group(group_of(user))
            && g.shared().read().media().uploaded_by(sha256, user)
        {
            return true;
        }
        self.node.groups().iter().any(|g| {
            let st = g.shared().read();
            st.media()
                .chats_with(sha256)
                .any(|chat| st.role(chat, user).is_some())
        })
    }

    /// What the replicated state knows of media `sha256` (any local group's record).
    fn known(&self, sha256: &[u8; MEDIA_SHA256_BYTES]) -> Option<chat::MediaRef> {
        self.node
            .groups()
            .iter()
            .find_map(|g| g.shared().read().media().file(sha256))
    }

    /// What this node's replicas know of media `sha256` for `user`: whether they let
    /// the user read it ([`Media::may_read`]), and the group that recorded its upload
    /// (whose replicas store the file), when one of them is here.
    pub fn grant(&self, user: UserId, sha256: &[u8; MEDIA_SHA256_BYTES]) -> (bool, Option<u64>) {
        (self.may_read(user, sha256), self.holder_group(sha256))
    }

    /// The media's reference when this node stores it or knows it, and `user` may read
    /// it (`granted`: another node found so; not checked again).
    async fn readable_ref(
        &self,
        user: UserId,
        sha256: &[u8; MEDIA_SHA256_BYTES],
        granted: bool,
    ) -> Result<v1::MediaRef, v1::Error> {
        let known = self.known(sha256);
        let store = self.store().await?;
        let s = *sha256;
        let local = match store.file_open(&s) {
            Some(f) => Some(f),
            None => {
                let st = Arc::clone(&store);
                blocking(move || st.file(&s)).await?
            }
        };
        if local.is_none() && known.is_none() {
            return Err(error(
                ErrorCode::NotFound,
                format!("no media {}", store::hex(sha256)),
            ));
        }
        if !granted && !self.may_read(user, sha256) {
            return Err(error(
                ErrorCode::PermissionDenied,
                format!(
                    "user {user} may not read media {}: neither its uploader nor a member \
                     of a chat it was sent to",
                    store::hex(sha256)
                ),
            ));
        }
        Ok(match (local, known) {
            (Some(f), _) => v1::MediaRef {
                sha256: Bytes::copy_from_slice(sha256),
                size_bytes: f.header.size,
                mime_type: f.header.mime_type.clone(),
                file_name: f.header.file_name.clone(),
            },
            (None, Some(k)) => v1::MediaRef {
                sha256: Bytes::copy_from_slice(sha256),
                size_bytes: k.size_bytes,
                mime_type: k.mime_type,
                file_name: k.file_name,
            },
            (None, None) => unreachable!("checked above"),
        })
    }

    /// Answers one media request of authenticated `user`. `read_granted`: another node
    /// found that the user may read the media of a download or info (see
    /// `ChatService::media_read`); this node serves what it stores without checking
    /// that again.
    pub async fn handle(
        &self,
        user: UserId,
        req: Req,
        read_granted: bool,
    ) -> Result<Resp, v1::Error> {
        let store = self.store().await?;
        match req {
            Req::MediaUploadStart(r) => {
                if r.mime_type.len() > MEDIA_MIME_TYPE_BYTES_MAX as usize
                    || r.file_name.len() > MEDIA_FILE_NAME_BYTES_MAX as usize
                {
                    return Err(error(
                        ErrorCode::TooLarge,
                        "media mime type or file name over its limit",
                    ));
                }
                if !r.sha256.is_empty() {
                    let s = sha(&r.sha256)?;
                    if let Ok(existing) = self.readable_ref(user, &s, false).await
                        && store.file(&s).ok().flatten().is_some()
                    {
                        return Ok(Resp::MediaUploadStart(v1::MediaUploadStartResponse {
                            existing: Some(existing),
                            ..Default::default()
                        }));
                    }
                }
                let st = Arc::clone(&store);
                let upload = blocking(move || {
                    st.start(user, r.size_bytes, &r.mime_type, &r.file_name, now_ms())
                })
                .await?;
                // Replicas learn of the upload with its first part; nothing to wait for.
                Ok(Resp::MediaUploadStart(v1::MediaUploadStartResponse {
                    upload_id: upload.header.upload_id,
                    part_bytes: upload.header.part_bytes,
                    part_count: upload.header.part_count(),
                    expires_in_ms: store.config().upload_ttl.as_millis() as u64,
                    existing: None,
                }))
            }
            Req::MediaUploadPart(r) => {
                let upload = store
                    .upload(user, r.upload_id)
                    .ok_or_else(|| no_upload(r.upload_id))?;
                let st = Arc::clone(&store);
                let up = Arc::clone(&upload);
                let data = r.data.clone();
                let (part, crc) = (r.part_index, r.crc32);
                // One blocking-pool thread writes the part (pwrite, group fdatasync),
                // hands the answer back, and then advances the upload's running SHA-256
                // itself: the hash stays off the answer's path without a second hand-off
                // to another thread per part.
                let (written_tx, written_rx) = tokio::sync::oneshot::channel();
                tokio::task::spawn_blocking(move || {
                    let written = st.write_part_bytes(&up, part, crc, &data);
                    let stored = written.is_ok();
                    let _ = written_tx.send(written);
                    if stored {
                        st.hash_ahead(&up);
                    }
                });
                let local = tokio::spawn(async move {
                    written_rx
                        .await
                        .map_err(|_| error(ErrorCode::Internal, "media write task failed"))?
                        .map_err(media_error)
                });
                // In a cluster the other replicas store it at the same time.
                self.replicator
                    .replicate_part(&self.node, &upload.header, part, crc, r.data, local)
                    .await
                    .map(|parts_held| {
                        Resp::MediaUploadPart(v1::MediaUploadPartResponse {
                            upload_id: r.upload_id,
                            part_index: part,
                            parts_held,
                        })
                    })
            }
            Req::MediaUploadStatus(r) => {
                let upload = store
                    .upload(user, r.upload_id)
                    .ok_or_else(|| no_upload(r.upload_id))?;
                let h = &upload.header;
                let ttl = store.config().upload_ttl.as_millis() as u64;
                Ok(Resp::MediaUploadStatus(v1::MediaUploadStatusResponse {
                    upload_id: r.upload_id,
                    size_bytes: h.size,
                    part_bytes: h.part_bytes,
                    part_count: h.part_count(),
                    missing_parts: upload.missing(),
                    expires_in_ms: (h.created_ms + ttl).saturating_sub(now_ms()),
                }))
            }
            Req::MediaUploadFinish(r) => {
                let s = sha(&r.sha256)?;
                self.finish(&store, user, r.upload_id, s).await
            }
            Req::MediaDownload(r) => {
                let s = sha(&r.sha256)?;
                if r.length == 0 || r.length > MEDIA_DOWNLOAD_BYTES_MAX {
                    return Err(bad(format!(
                        "length {} is not 1 to {MEDIA_DOWNLOAD_BYTES_MAX}",
                        r.length
                    )));
                }
                let file = self.readable_file(&store, user, &s, read_granted).await?;
                let size = file.header.size;
                let (offset, len) = (r.offset, r.length as usize);
                // A whole part is a slice of the mapped file (no copy; the gateway
                // writes it after the frame's head with one `writev`). Checked on the
                // blocking pool: the CRC pass may fault pages in from the disk. (Done on
                // the request's task when the range was resident, the download fell to
                // half in an A/B run of session 7, so it stays here.)
                let (data, crc32) = blocking(move || file.read_shared(offset, len)).await?;
                Ok(Resp::MediaDownload(v1::MediaDownloadResponse {
                    offset: r.offset,
                    crc32,
                    data,
                    size_bytes: size,
                }))
            }
            Req::MediaInfo(r) => {
                let s = sha(&r.sha256)?;
                let media = self.readable_ref(user, &s, read_granted).await?;
                Ok(Resp::MediaInfo(v1::MediaInfoResponse {
                    media: Some(media),
                }))
            }
            other => Err(bad(format!("not a media request: {other:?}"))),
        }
    }

    /// The stored file `s` when `user` may read it and this node holds it.
    async fn readable_file(
        &self,
        store: &Arc<MediaStore>,
        user: UserId,
        s: &[u8; MEDIA_SHA256_BYTES],
        granted: bool,
    ) -> Result<Arc<store::StoredFile>, v1::Error> {
        self.readable_ref(user, s, granted).await?;
        if let Some(f) = store.file_open(s) {
            return Ok(f);
        }
        let st = Arc::clone(store);
        let h = *s;
        if let Some(f) = blocking(move || st.file(&h)).await? {
            return Ok(f);
        }
        // A replica of the file's group that missed it fetches it from the others first.
        let detail = match self.holder_group(s) {
            Some(group) => match self.fetch_for_read(*s, group).await {
                Ok(true) => {
                    let st = Arc::clone(store);
                    if let Some(f) = blocking(move || st.file(&h)).await? {
                        return Ok(f);
                    }
                    "it was fetched but is gone".to_string()
                }
                Ok(false) => "it is being fetched from the other replicas; retry".to_string(),
                Err(e) => format!("fetching it from the other replicas failed: {e}"),
            },
            None => "ask another node of the cluster".to_string(),
        };
        let mut e = error(
            ErrorCode::Unavailable,
            format!(
                "media {} is not stored on this node (node {}): {detail}",
                store::hex(s),
                self.node.node_id()
            ),
        );
        e.retry_after_ms = 1000;
        Err(e)
    }

    async fn finish(
        &self,
        store: &Arc<MediaStore>,
        user: UserId,
        upload_id: u64,
        s: [u8; MEDIA_SHA256_BYTES],
    ) -> Result<Resp, v1::Error> {
        let Some(upload) = store.upload(user, upload_id) else {
            // A repeated finish of an upload that finished: answer the same reference.
            let group = self.node.group(group_of(user));
            if group.is_some_and(|g| g.shared().read().media().uploaded_by(&s, user)) {
                let media = self.readable_ref(user, &s, false).await?;
                return Ok(Resp::MediaUploadFinish(v1::MediaUploadFinishResponse {
                    media: Some(media),
                    media_id: store::hex(&s),
                    deduplicated: false,
                }));
            }
            return Err(no_upload(upload_id));
        };
        let _finishing = upload.finishing().await;
        // Check the hash first, then record the upload in Raft, then move the file into
        // place: a crash or a failed proposal in between leaves the upload to finish again.
        let (st, up) = (Arc::clone(store), Arc::clone(&upload));
        blocking(move || st.check(&up, &s)).await?;
        let h = &upload.header;
        let media = chat::MediaRef {
            sha256: s,
            size_bytes: h.size,
            mime_type: h.mime_type.clone(),
            file_name: h.file_name.clone(),
        };
        let group = group_of(user);
        match self
            .node
            .propose(
                group,
                Command::MediaStored {
                    uploader: user,
                    media: media.clone(),
                },
            )
            .await
            .map_err(propose_error)?
        {
            Outcome::Refused(r) => return Err(refusal(r)),
            Outcome::MediaStored { .. } => {}
            o => return Err(error(ErrorCode::Internal, format!("unexpected {o:?}"))),
        }
        let (st, up) = (Arc::clone(store), Arc::clone(&upload));
        let finished = blocking(move || st.commit(&up, &s)).await?;
        self.replicator.finish(&self.node, &upload.header, s).await;
        Ok(Resp::MediaUploadFinish(v1::MediaUploadFinishResponse {
            media: Some(v1::MediaRef {
                sha256: Bytes::copy_from_slice(&s),
                size_bytes: media.size_bytes,
                mime_type: media.mime_type,
                file_name: media.file_name,
            }),
            media_id: store::hex(&s),
            deduplicated: finished.deduplicated,
        }))
    }
}

fn no_upload(id: u64) -> v1::Error {
    error(
        ErrorCode::NotFound,
        format!("no upload {id} of yours on this node (finished, expired or never started here)"),
    )
}

/// Deletes expired uploads every half TTL (bounded), until the media side is dropped.
async fn expiry_task(media: Weak<Media>) {
    let pause = {
        let Some(m) = media.upgrade() else { return };
        if let Err(e) = m.store().await {
            tracing::error!(error = ?e, "cannot open the media store");
        }
        (m.config.upload_ttl / 2).clamp(EXPIRY_SWEEP_MIN, EXPIRY_SWEEP_MAX)
    };
    loop {
        tokio::time::sleep(pause).await;
        let Some(m) = media.upgrade() else { return };
        if let Some(store) = m.store_if_open() {
            let _ = tokio::task::spawn_blocking(move || store.expire(now_ms())).await;
        }
    }
}
