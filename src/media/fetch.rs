//! Media a replica missed: fetching finished files from the other replicas of the
//! uploader's group.
//!
//! What it owns: bringing a finished file this node should hold (its group's Raft state
//! records it) but does not into the local store, part by part, from the group's other
//! replicas over the node transport (the `fetch` kind of `media_request`); checking each
//! part against the CRC-32 the serving peer read from its slot (and the peer checks its
//! own bytes against it before answering), and the whole file's SHA-256 before the file
//! counts as stored (`MediaStore::finish`, the same check an upload gets); one fetch per
//! file at a time, however many readers wait for it; the background catch-up that scans
//! the local groups' media records after a restart or a replica move and fetches what
//! is missing at a bounded rate; and answering peers' fetches. What it must not do:
//! decide who may read a file (the service checks before it asks for a fetch), propose
//! anything to Raft, serve a byte that failed a check, or hold more than
//! [`FETCH_PARTS_IN_FLIGHT_MAX`] parts per fetch in memory.
//!
//! A fetch fills an ordinary upload file (the original upload's header, so the result
//! is byte-identical to the peers' copies, and a partial copy this node kept from the
//! upload itself is reused: only its missing parts travel), pinned against expiry while
//! it runs; a part no peer serves correctly leaves the upload as it is for the next try.
//!
//! Fetch answer bytes (little-endian; `str` is a u32 length then UTF-8):
//!
//! ```text
//! status u8 (0 served, 4 not stored here, 5 failed, e.g. the part fails its CRC)
//! | message str | when served: upload_id u64 | uploader u64 | size u64 | part_bytes u32
//! | created_ms u64 | mime str | file name str | part crc32 u32 | part bytes (rest)
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_raft::GroupId;
use chatlog_wire::limits::{MEDIA_PART_BYTES, MEDIA_SHA256_BYTES};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::Media;
use super::replicate::{KIND_FETCH, PEER_MEDIA_TIMEOUT, Reader, put_header, read_header};
use super::store::{self, Header, MediaError, MediaStore};

/// How long a download waits for a fetch of the file it asks for before it answers
/// `UNAVAILABLE` with a retry hint (the client repeats a download after it): long
/// enough for a file of a few hundred MiB between replicas, short enough that the
/// request stays well within the client's request timeout (10 s by default).
pub const FETCH_WAIT_ON_READ: Duration = Duration::from_secs(5);
/// How often the background catch-up looks for files this node should hold but does
/// not: a restarted replica or one a move added starts catching up within this.
pub const CATCH_UP_SCAN_EVERY: Duration = Duration::from_secs(2);
/// Bytes per second the background catch-up fetches at most: a quarter of the disk's
/// sequential write speed, so a new replica catching up on a group's media leaves the
/// disk and the peers' page cache to the live traffic. A download waiting for the file
/// lifts the limit for that file.
pub const CATCH_UP_BYTES_PER_SEC: u64 = 256 * 1024 * 1024;
/// Files one catch-up scan queues at most (32 bytes each); the rest wait for the next.
pub const CATCH_UP_FILES_PER_SCAN_MAX: usize = 256;
/// How long a file whose fetch failed (no peer served it correctly) is left alone
/// before the catch-up tries it again.
pub const CATCH_UP_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Parts one fetch keeps in flight (asked of peers, checked, being written): enough to
/// cover a round trip and an fdatasync per part with other parts' transfers (one part
/// at a time made a fetch a chain of round trips), few enough that a fetch holds at most
/// 4 × 512 KiB = 2 MiB and leaves the peers' and the disk's capacity to live uploads.
pub const FETCH_PARTS_IN_FLIGHT_MAX: usize = 4;
/// Longest message in a fetch answer, in bytes.
const FETCH_MESSAGE_BYTES_MAX: usize = 1024;

const STATUS_SERVED: u8 = 0;
const STATUS_NOT_STORED: u8 = 4;
const STATUS_FAILED: u8 = 5;

/// The outcome of a fetch as its waiters see it: `None` while it runs.
type Outcome = Option<Result<(), String>>;

/// A fetch in progress.
#[derive(Debug)]
struct Running {
    done: watch::Receiver<Outcome>,
    /// Set when a reader waits: the fetch drops its rate limit.
    hurry: Arc<AtomicBool>,
}

/// Which fetches run, which files are known to be here, and which failed lately.
#[derive(Debug, Default)]
pub struct Fetcher {
    running: Mutex<HashMap<[u8; MEDIA_SHA256_BYTES], Running>>,
    /// Files seen stored here (finished files are never removed while the node runs),
    /// so scans skip them without a look at the disk.
    present: Mutex<HashSet<[u8; MEDIA_SHA256_BYTES]>>,
    failed: Mutex<HashMap<[u8; MEDIA_SHA256_BYTES], Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encodes a fetch of part `part` of file `sha256`.
fn encode_fetch(sha256: &[u8; MEDIA_SHA256_BYTES], part: u32) -> Bytes {
    let mut out = Vec::with_capacity(37);
    out.push(KIND_FETCH);
    out.extend_from_slice(sha256);
    out.extend_from_slice(&part.to_le_bytes());
    Bytes::from(out)
}

fn encode_refusal(status: u8, message: &str) -> Bytes {
    let mut m = message.to_string();
    m.truncate(m.floor_char_boundary(FETCH_MESSAGE_BYTES_MAX));
    let mut out = Vec::with_capacity(5 + m.len());
    out.push(status);
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(m.as_bytes());
    Bytes::from(out)
}

/// Why one attempt of a fetch failed.
#[derive(Debug)]
enum Fetch {
    /// Every part checked, the whole did not hash to the media id (the upload is gone).
    Mismatch(String),
    /// Anything else: no peer served a part, or the local store failed.
    Failed(String),
}

/// A part as a peer served it.
#[derive(Debug)]
struct Served {
    header: Header,
    crc32: u32,
    data: Bytes,
}

fn decode_served(body: &Bytes) -> Result<Result<Served, String>, String> {
    let mut r = Reader(body);
    let status = r.take(1)?[0];
    let message = r.str(FETCH_MESSAGE_BYTES_MAX as u32)?;
    if status != STATUS_SERVED {
        return Ok(Err(message));
    }
    let header = read_header(&mut r)?;
    let crc32 = r.u32()?;
    let at = body.len() - r.0.len();
    Ok(Ok(Served {
        header,
        crc32,
        data: body.slice(at..),
    }))
}

/// Answers a peer's fetch of part `part` of file `sha256` from this node's store: the
/// part as read from the mapped file after its CRC check, or why not.
pub(super) async fn serve_part(
    store: Arc<MediaStore>,
    sha256: [u8; MEDIA_SHA256_BYTES],
    part: u32,
) -> Bytes {
    let served = tokio::task::spawn_blocking(move || {
        let Some(file) = store.file(&sha256)? else {
            return Ok(None);
        };
        let h = &file.header;
        if part >= h.part_count() {
            return Err(MediaError::BadRequest(format!(
                "part {part} is out of range: the file has {} parts",
                h.part_count()
            )));
        }
        let offset = u64::from(part) * u64::from(h.part_bytes);
        // A whole part: checked on the mapping, copied once, into the answer below.
        let (data, crc32) = file.read_shared(offset, h.part_len(part))?;
        Ok(Some((h.clone(), crc32, data)))
    })
    .await;
    match served {
        Ok(Ok(Some((header, crc32, data)))) => {
            let mut out = Vec::with_capacity(
                64 + header.mime_type.len() + header.file_name.len() + data.len(),
            );
            out.push(STATUS_SERVED);
            out.extend_from_slice(&0u32.to_le_bytes());
            put_header(&mut out, &header);
            out.extend_from_slice(&crc32.to_le_bytes());
            out.extend_from_slice(&data);
            Bytes::from(out)
        }
        Ok(Ok(None)) => encode_refusal(
            STATUS_NOT_STORED,
            &format!("media {} is not stored here", store::hex(&sha256)),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, part, "refused a peer's fetch of a media part");
            encode_refusal(STATUS_FAILED, &e.to_string())
        }
        Err(e) => encode_refusal(STATUS_FAILED, &format!("fetch task failed: {e}")),
    }
}

impl Media {
    /// The local group whose Raft state records file `sha256` (its uploader's group,
    /// whose replicas hold the bytes), if any.
    pub(super) fn holder_group(&self, sha256: &[u8; MEDIA_SHA256_BYTES]) -> Option<GroupId> {
        self.node
            .groups()
            .iter()
            .find(|g| g.shared().read().media().file(sha256).is_some())
            .map(|g| g.id())
    }

    /// The other replicas of `group` to fetch from: those the current placement names,
    /// then those of the static configuration (a move may have left the bytes there).
    fn fetch_peers(&self, group: GroupId) -> Vec<u64> {
        let me = self.node.node_id();
        let mut peers: Vec<u64> = Vec::new();
        for n in self
            .node
            .replicas_of(group)
            .into_iter()
            .chain(self.node.config().placement(group))
        {
            if n != me && !peers.contains(&n) {
                peers.push(n);
            }
        }
        peers
    }

    /// Starts fetching file `sha256` of `group` (or joins the fetch already running) and
    /// returns where its outcome shows. `hurry` lifts the catch-up rate limit.
    pub(super) fn start_fetch(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        group: GroupId,
        hurry: bool,
        partial_upload: Option<u64>,
    ) -> watch::Receiver<Outcome> {
        let mut running = lock(&self.fetcher.running);
        if let Some(r) = running.get(&sha256)
            && r.done.borrow().is_none()
        {
            if hurry {
                r.hurry.store(true, Ordering::Relaxed);
            }
            return r.done.clone();
        }
        let (tx, rx) = watch::channel(None);
        let flag = Arc::new(AtomicBool::new(hurry));
        running.insert(
            sha256,
            Running {
                done: rx.clone(),
                hurry: Arc::clone(&flag),
            },
        );
        drop(running);
        let Some(me) = self.this.upgrade() else {
            let _ = tx.send(Some(Err("the media side is shutting down".into())));
            return rx;
        };
        tokio::spawn(async move {
            let outcome = me.fetch_file(sha256, group, &flag).await;
            if let Some(id) = partial_upload
                && let Some(store) = me.store_if_open()
            {
                // A partial copy from the upload itself that the fetch did not reuse.
                let _ = tokio::task::spawn_blocking(move || store.remove_upload(id)).await;
            }
            match &outcome {
                Ok(()) => {
                    lock(&me.fetcher.present).insert(sha256);
                    lock(&me.fetcher.failed).remove(&sha256);
                    tracing::info!(media = %store::hex(&sha256), group, "fetched a media file from a peer replica");
                }
                Err(e) => {
                    lock(&me.fetcher.failed).insert(sha256, Instant::now());
                    tracing::warn!(media = %store::hex(&sha256), group, error = %e, "could not fetch a media file from the peer replicas");
                }
            }
            lock(&me.fetcher.running).remove(&sha256);
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// Fetches in the background (a finish told this replica of an upload it holds only
    /// part of).
    pub(super) fn fetch_in_background(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        group: GroupId,
        partial_upload: Option<u64>,
    ) {
        drop(self.start_fetch(sha256, group, false, partial_upload));
    }

    /// Waits at most [`FETCH_WAIT_ON_READ`] for file `sha256` of `group` to be fetched
    /// for a reader. `Ok(true)`: stored now; `Ok(false)`: still fetching.
    pub(super) async fn fetch_for_read(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        group: GroupId,
    ) -> Result<bool, String> {
        let mut rx = self.start_fetch(sha256, group, true, None);
        match tokio::time::timeout(FETCH_WAIT_ON_READ, rx.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => done.clone().expect("some").map(|()| true),
            Ok(Err(_)) => Err("the fetch stopped".into()),
            Err(_) => Ok(false),
        }
    }

    /// Asks `peers` in turn (from `first`) for part `part` of `sha256` until one serves
    /// bytes that pass their CRC; every refusal or failed check is kept for the error.
    async fn fetch_part(
        &self,
        peers: &[u64],
        first: usize,
        group: GroupId,
        sha256: &[u8; MEDIA_SHA256_BYTES],
        part: u32,
        want: Option<&Header>,
    ) -> Result<Served, String> {
        let router = self
            .node
            .router()
            .ok_or("this node has no peers to fetch from")?;
        let body = encode_fetch(sha256, part);
        let mut failures = Vec::new();
        for k in 0..peers.len() {
            let peer = peers[(first + k) % peers.len()];
            let answer = match router
                .media(peer, group, body.clone(), PEER_MEDIA_TIMEOUT)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    failures.push(format!("node {peer}: {e}"));
                    continue;
                }
            };
            let served = match decode_served(&answer) {
                Ok(Ok(s)) => s,
                Ok(Err(refusal)) => {
                    failures.push(format!("node {peer}: {refusal}"));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("node {peer} answered with {e}"));
                    continue;
                }
            };
            let h = &served.header;
            let problem = if want.is_some_and(|w| w != h) {
                Some("another description of the file".to_string())
            } else if h.part_bytes != MEDIA_PART_BYTES || part >= h.part_count() {
                Some(format!(
                    "a header of {} parts of {} bytes",
                    h.part_count(),
                    h.part_bytes
                ))
            } else if served.data.len() != h.part_len(part) {
                Some(format!("{} bytes for part {part}", served.data.len()))
            } else if crc32fast::hash(&served.data) != served.crc32 {
                Some(format!("part {part} failing its CRC-32"))
            } else {
                None
            };
            match problem {
                Some(p) => {
                    tracing::warn!(peer, part, problem = %p, "refused a media part a peer served");
                    failures.push(format!("node {peer} served {p}"));
                }
                None => return Ok(served),
            }
        }
        Err(format!(
            "no replica of group {group} served part {part} of media {}: {}",
            store::hex(sha256),
            if failures.is_empty() {
                "no other replica".to_string()
            } else {
                failures.join("; ")
            }
        ))
    }

    /// Fetches every part of `sha256` this node lacks, then finishes the local copy
    /// (SHA-256 check); at most [`CATCH_UP_BYTES_PER_SEC`] unless `hurry` is set.
    async fn fetch_file(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        group: GroupId,
        hurry: &AtomicBool,
    ) -> Result<(), String> {
        let store = self.store().await.map_err(|e| e.message)?;
        let s = Arc::clone(&store);
        if tokio::task::spawn_blocking(move || s.file(&sha256))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(());
        }
        let size = self
            .node
            .group(group)
            .and_then(|g| g.shared().read().media().file(&sha256))
            .map(|f| f.size_bytes);
        let peers = self.fetch_peers(group);
        // Parts from all peers in turn first (spreading the load); when the whole does
        // not hash right although every part checked, one peer may hold a copy whose
        // parts check but whose content is wrong: then each peer alone, in turn.
        let mut last = String::new();
        for attempt in std::iter::once(peers.clone()).chain(peers.iter().map(|p| vec![*p])) {
            match self
                .fetch_from(&store, &attempt, group, sha256, size, hurry)
                .await
            {
                Ok(()) => return Ok(()),
                Err(Fetch::Mismatch(e)) => {
                    tracing::warn!(peers = ?attempt, error = %e, "fetched media parts do not make the file");
                    last = e;
                }
                Err(Fetch::Failed(e)) => return Err(e),
            }
            if peers.len() == 1 {
                break;
            }
        }
        Err(last)
    }

    /// One attempt of [`Media::fetch_file`], parts from `peers` only.
    async fn fetch_from(
        &self,
        store: &Arc<MediaStore>,
        peers: &[u64],
        group: GroupId,
        sha256: [u8; MEDIA_SHA256_BYTES],
        size: Option<u64>,
        hurry: &AtomicBool,
    ) -> Result<(), Fetch> {
        // Part 0 first: it brings the file's description.
        let first = self
            .fetch_part(peers, 0, group, &sha256, 0, None)
            .await
            .map_err(Fetch::Failed)?;
        let header = first.header.clone();
        if size.is_some_and(|s| s != header.size) {
            return Err(Fetch::Failed(format!(
                "a peer describes media {} with {} bytes, the group's record says {:?}",
                store::hex(&sha256),
                header.size,
                size
            )));
        }
        let s = Arc::clone(store);
        let h = header.clone();
        let upload = tokio::task::spawn_blocking(move || {
            let u = s.upload_or_create(h)?;
            s.pin(u.header.upload_id);
            Ok::<_, MediaError>(u)
        })
        .await
        .map_err(|e| Fetch::Failed(e.to_string()))?
        .map_err(|e| Fetch::Failed(e.to_string()))?;
        let upload_id = upload.header.upload_id;
        let result = async {
            let started = Instant::now();
            let mut bytes: u64 = 0;
            let mut first = Some(first);
            let (header, sha) = (&header, &sha256);
            // Up to FETCH_PARTS_IN_FLIGHT_MAX parts travel and are stored at once (each
            // fetched, checked and written on its own), so a fetch is not one round
            // trip plus one fdatasync per part; parts may complete in any order.
            let mut parts = futures_util::stream::iter(upload.missing().into_iter().enumerate())
                .map(|(k, part)| {
                    let served_first = if part == 0 { first.take() } else { None };
                    let (s, u) = (Arc::clone(store), Arc::clone(&upload));
                    async move {
                        let served = match served_first {
                            Some(f) => f,
                            None => self
                                .fetch_part(peers, k, group, sha, part, Some(header))
                                .await
                                .map_err(Fetch::Failed)?,
                        };
                        let len = served.data.len() as u64;
                        tokio::task::spawn_blocking(move || {
                            s.write_part_bytes(&u, part, served.crc32, &served.data)?;
                            s.hash_ahead(&u);
                            Ok::<_, MediaError>(())
                        })
                        .await
                        .map_err(|e| Fetch::Failed(e.to_string()))?
                        .map_err(|e| Fetch::Failed(format!("storing a fetched part: {e}")))?;
                        Ok::<u64, Fetch>(len)
                    }
                })
                .buffer_unordered(FETCH_PARTS_IN_FLIGHT_MAX);
            while let Some(stored) = parts.next().await {
                bytes += stored?;
                if !hurry.load(Ordering::Relaxed) {
                    let due = Duration::from_secs_f64(bytes as f64 / CATCH_UP_BYTES_PER_SEC as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let (s, u) = (Arc::clone(store), Arc::clone(&upload));
            tokio::task::spawn_blocking(move || s.finish(&u, &sha256))
                .await
                .map_err(|e| Fetch::Failed(e.to_string()))?
                .map(|_| ())
                .map_err(|e| match e {
                    MediaError::BadRequest(m) => Fetch::Mismatch(format!(
                        "the fetched parts do not make media {}: {m}",
                        store::hex(&sha256)
                    )),
                    e => Fetch::Failed(e.to_string()),
                })
        }
        .await;
        store.unpin(upload_id);
        result
    }

    /// Files the local groups record that this node does not store, skipping those
    /// fetching or failed lately; at most [`CATCH_UP_FILES_PER_SCAN_MAX`].
    async fn files_to_catch_up(&self) -> Vec<([u8; MEDIA_SHA256_BYTES], GroupId)> {
        let Some(store) = self.store_if_open() else {
            return Vec::new();
        };
        let mut wanted = Vec::new();
        {
            let present = lock(&self.fetcher.present);
            let running = lock(&self.fetcher.running);
            let mut failed = lock(&self.fetcher.failed);
            failed.retain(|_, at| at.elapsed() < CATCH_UP_RETRY_AFTER);
            'groups: for g in self.node.groups() {
                let st = g.shared().read();
                for sha in st.media().file_ids() {
                    if wanted.len() >= CATCH_UP_FILES_PER_SCAN_MAX {
                        break 'groups;
                    }
                    if !present.contains(sha)
                        && !running.contains_key(sha)
                        && !failed.contains_key(sha)
                    {
                        wanted.push((*sha, g.id()));
                    }
                }
            }
        }
        let checked = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(sha, g)| (sha, g, store.file_path(&sha).exists()))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut present = lock(&self.fetcher.present);
        checked
            .into_iter()
            .filter_map(|(sha, g, here)| {
                if here {
                    present.insert(sha);
                    None
                } else {
                    Some((sha, g))
                }
            })
            .collect()
    }
}

/// Every [`CATCH_UP_SCAN_EVERY`], fetches (one file at a time, rate-limited) the files
/// the local groups record and this node lacks, until the media side is dropped.
pub(super) async fn catch_up_task(media: std::sync::Weak<Media>) {
    loop {
        tokio::time::sleep(CATCH_UP_SCAN_EVERY).await;
        let Some(m) = media.upgrade() else { return };
        if m.node.router().is_none() {
            return; // a single node has nobody to fetch from
        }
        for (sha, group) in m.files_to_catch_up().await {
            let mut rx = m.start_fetch(sha, group, false, None);
            let _ = rx.wait_for(Option::is_some).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_and_answers_round_trip_and_cut_ones_are_refused() {
        let body = encode_fetch(&[7; 32], 3);
        assert_eq!(body.len(), 37);
        assert_eq!(body[0], KIND_FETCH);
        let h = Header {
            upload_id: 9,
            uploader: 65_537,
            size: 1000,
            part_bytes: MEDIA_PART_BYTES,
            created_ms: 77,
            mime_type: "image/png".into(),
            file_name: "a.png".into(),
        };
        let mut out = vec![STATUS_SERVED, 0, 0, 0, 0];
        put_header(&mut out, &h);
        out.extend_from_slice(&5u32.to_le_bytes());
        out.extend_from_slice(b"abc");
        let out = Bytes::from(out);
        let s = decode_served(&out).expect("decodes").expect("served");
        assert_eq!((s.header, s.crc32, &s.data[..]), (h, 5, &b"abc"[..]));
        for len in 0..out.len() - 3 {
            assert!(decode_served(&out.slice(..len)).is_err(), "cut at {len}");
        }
        let refused = encode_refusal(STATUS_NOT_STORED, "not here");
        assert_eq!(
            decode_served(&refused)
                .expect("decodes")
                .expect_err("refused"),
            "not here"
        );
    }
}
