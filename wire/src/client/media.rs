//! Whole-file media transfers over [`Client`]: a resumable, pipelined upload and a
//! checked, resumable download (`PROTOCOL.md`, "Media").
//!
//! What it owns: cutting a local file into parts of the server's part size, the CRC-32 of
//! each part and the SHA-256 of the whole file (both computed while the file is read, so
//! a file is read once per attempt; the hash is skipped when the caller knows it,
//! [`UploadOptions::sha256`]), keeping a bounded number of parts in flight, asking
//! the server which parts it lacks (after a reconnect, a server restart or a move to
//! another node) and sending only those; and on the way back, checking the CRC-32 of
//! every chunk (the one stored with the part at upload) and, when asked or when bytes of
//! an earlier attempt are kept, the SHA-256 of the whole file ([`DownloadCheck`]) before
//! reporting success. What it must
//! not do: keep state across processes (the caller persists the upload id or the output
//! file it resumes from) or hold more than the parts in flight in memory.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::{Client, ClientError};
use crate::limits::{MEDIA_DOWNLOAD_BYTES_MAX, MEDIA_FILE_BYTES_MAX, MEDIA_SHA256_BYTES};
use crate::proto::v1;

/// Default and largest number of parts [`Client::upload_file`] keeps in flight.
///
/// Why: each part in flight holds one part in memory (512 KiB) and one request slot;
/// parts in flight together share the server's fdatasyncs, so more in flight means more
/// bytes per sync and parts arriving while a sync runs (with 16, the pipe ran dry while
/// a sync of the previous group ran). With 32, a window could sit whole in one sync
/// while nothing new arrived; 64 leave parts arriving during a sync (session 8, on a
/// loaded host: 64 ahead of 32 in three interleaved pairs, by 0.5% to 8%), while
/// bounding the client's memory to 32 MiB, half the server's 128 requests in flight
/// per connection.
pub const UPLOAD_PARTS_IN_FLIGHT_MAX: usize = 64;

/// Default and largest number of chunks [`Client::download_file`] keeps in flight, so
/// the server always has the next chunks asked while the client checks the last ones.
/// Twice this many chunks may be held (those in flight and those waiting for the
/// writing thread): 32 MiB at most.
pub const DOWNLOAD_IN_FLIGHT_MAX: usize = 32;

/// Progress of a transfer, reported after each part or chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferProgress {
    /// The upload (0 for a download, or an upload that found the file already stored).
    pub upload_id: u64,
    /// Bytes done so far: acknowledged by the server (upload) or received, checked and
    /// queued for writing in order (download), including bytes an earlier attempt
    /// already transferred.
    pub bytes_done: u64,
    /// The file's size.
    pub bytes_total: u64,
}

/// Options of [`Client::upload_file`].
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// The MIME type recorded with the file (may be empty).
    pub mime_type: String,
    /// The file name recorded with it; empty: the local file's name.
    pub file_name: String,
    /// An upload to resume (from an earlier, interrupted attempt). When the server no
    /// longer knows it (expired, or another node without it), a new upload starts.
    pub resume_upload_id: Option<u64>,
    /// Parts in flight, 1 to [`UPLOAD_PARTS_IN_FLIGHT_MAX`]; 0 means the maximum.
    pub parts_in_flight: usize,
    /// The file's SHA-256 when the caller knows it already (it hashed the file before,
    /// or made it): sent with `media_upload_start`, so a file the server stores already
    /// and the user may read is not sent again (the answer's `existing`), and the upload
    /// does not hash the file itself. A wrong hash is refused by the server at finish
    /// (it hashes what it received), so nothing wrong is ever stored under it.
    pub sha256: Option<[u8; MEDIA_SHA256_BYTES]>,
}

/// What a download checks beyond each chunk's CRC-32 (`PROTOCOL.md`, "Media").
///
/// Every chunk is always checked against its CRC-32: for the whole parts a download asks
/// for, the CRC the server stored when the part was uploaded (the uploader's CRC, which
/// the server checked the bytes against before storing them, and the file's SHA-256 was
/// checked over those same bytes at finish) and checked the stored bytes against again
/// before sending them. That catches damage on the server's disk, in its memory after
/// its check and on the way. What it cannot catch is a server that answers a chunk with
/// other bytes and their matching CRC (a server bug); [`DownloadCheck::Sha256`] does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DownloadCheck {
    /// Each chunk's CRC-32 only. The SHA-256 of the whole file is not computed, because
    /// on one core it is the slowest step of a download (about 1.8 GB/s with SHA-NI
    /// against more than 10 GB/s for the hardware CRC): the default, except for kept
    /// bytes of a resumed download (below).
    #[default]
    PartCrcs,
    /// Also the SHA-256 of the whole file against the media id, on a thread of its own.
    /// Always used when [`DownloadOptions::resume`] keeps bytes of an earlier attempt:
    /// those bytes came from the local disk, and nothing else checks them.
    Sha256,
}

/// Options of [`Client::download_file`].
#[derive(Debug, Clone, Default)]
pub struct DownloadOptions {
    /// Resume: the output file's first bytes, up to its current length, are kept (and
    /// checked with the rest at the end, by the SHA-256 of the whole file) instead of
    /// downloaded again.
    pub resume: bool,
    /// Chunks in flight, 1 to [`DOWNLOAD_IN_FLIGHT_MAX`]; 0 means the maximum.
    pub chunks_in_flight: usize,
    /// What is checked beyond each chunk's CRC-32.
    pub check: DownloadCheck,
}

/// The media id of a hash: its 64 lowercase hex digits.
pub fn media_id_hex(sha256: &[u8]) -> String {
    sha256.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash named by a media id (64 hex digits), or `None`.
pub fn parse_media_id(id: &str) -> Option<[u8; MEDIA_SHA256_BYTES]> {
    if id.len() != 2 * MEDIA_SHA256_BYTES || !id.is_ascii() {
        return None;
    }
    let mut out = [0u8; MEDIA_SHA256_BYTES];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&id[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn local(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ClientError {
    let path = path.display().to_string();
    move |source| ClientError::LocalFile {
        action,
        path,
        source,
    }
}

/// Reads `len` bytes at `offset` of `file` with their CRC-32, on the blocking pool (the
/// runtime's threads stay free for the connection), into `reuse` when it is given (a
/// part buffer sent before and handed back, see [`PartBuffers`]) or a new buffer.
async fn read_part(
    file: &Arc<File>,
    path: &Path,
    offset: u64,
    len: usize,
    reuse: Option<BytesMut>,
) -> Result<(Bytes, u32), ClientError> {
    let file = Arc::clone(file);
    // A reused buffer keeps its old bytes (overwritten below); only growth is zeroed.
    let mut buf = reuse.unwrap_or_default();
    buf.truncate(len);
    buf.resize(len, 0);
    let result = tokio::task::spawn_blocking(move || {
        file.read_exact_at(&mut buf, offset).map(|()| {
            let crc = crc32fast::hash(&buf);
            (buf.freeze(), crc)
        })
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("file reader task failed: {e}")))?;
    result.map_err(local("reading", path))
}

/// Part buffers of an upload taken back once their part is acknowledged, at most
/// [`UPLOAD_PARTS_IN_FLIGHT_MAX`] + 1 of them. A new buffer per part cost the load
/// generator about a third of its upload CPU (the allocator hands the freed pages back
/// to the kernel and every new part faulted fresh zeroed pages in again: `perf`, session
/// 9, `benches/RESULTS.md`). A buffer still shared (the hasher has not reached it, or
/// the connection still holds it) is simply dropped, never waited for.
#[derive(Default)]
struct PartBuffers(Vec<BytesMut>);

impl PartBuffers {
    fn take(&mut self) -> Option<BytesMut> {
        self.0.pop()
    }

    fn give_back(&mut self, sent: Bytes) {
        if self.0.len() <= UPLOAD_PARTS_IN_FLIGHT_MAX
            && let Ok(buf) = sent.try_into_mut()
        {
            self.0.push(buf);
        }
    }
}

/// A SHA-256 computed on its own thread of the blocking pool from buffers sent to it in
/// order, so hashing runs beside reading, sending and receiving instead of in turn with
/// them. Its queue holds at most `window` buffers: a slow hasher slows the sender.
struct Hasher {
    queue: tokio::sync::mpsc::Sender<Bytes>,
    done: JoinHandle<Sha256>,
}

impl Hasher {
    fn start(initial: Sha256, window: usize) -> Hasher {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<Bytes>(window.max(1));
        let done = tokio::task::spawn_blocking(move || {
            let mut h = initial;
            while let Some(b) = rx.blocking_recv() {
                h.update(&b);
            }
            h
        });
        Hasher { queue, done }
    }

    async fn update(&self, bytes: Bytes) -> Result<(), ClientError> {
        self.queue
            .send(bytes)
            .await
            .map_err(|_| ClientError::Protocol("the hashing task stopped".into()))
    }

    async fn finish(self) -> Result<[u8; MEDIA_SHA256_BYTES], ClientError> {
        drop(self.queue);
        let h = self
            .done
            .await
            .map_err(|e| ClientError::Protocol(format!("hashing task failed: {e}")))?;
        Ok(h.finalize().into())
    }
}

/// Reads `len` bytes at `offset` of `file` on the blocking pool.
async fn read_at(
    file: &Arc<File>,
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, ClientError> {
    let file = Arc::clone(file);
    let mut buf = vec![0u8; len];
    let result =
        tokio::task::spawn_blocking(move || file.read_exact_at(&mut buf, offset).map(|()| buf))
            .await
            .map_err(|e| ClientError::Protocol(format!("file reader task failed: {e}")))?;
    result.map_err(local("reading", path))
}

impl Client {
    /// Uploads the file at `path` and returns the stored file's reference.
    ///
    /// Flow: `media_upload_start` (or `media_upload_status` of
    /// [`UploadOptions::resume_upload_id`]), then the file is read once, in order, hashed
    /// as it goes, and every part the server reports missing is sent with its CRC-32,
    /// with up to [`UploadOptions::parts_in_flight`] parts in flight; then
    /// `media_upload_finish` with the SHA-256. Parts repeated after a drop are harmless.
    /// If the connection dropped for good, call again with the same resume id (also
    /// against another node of the cluster): only what that node lacks is sent.
    /// `on_progress` is called once the upload id is known (so the caller can persist it)
    /// and after each acknowledged part.
    pub async fn upload_file(
        &self,
        path: &Path,
        options: UploadOptions,
        mut on_progress: impl FnMut(TransferProgress),
    ) -> Result<v1::MediaUploadFinishResponse, ClientError> {
        let file = Arc::new(File::open(path).map_err(local("opening", path))?);
        let size = file.metadata().map_err(local("reading", path))?.len();
        if size == 0 || size > MEDIA_FILE_BYTES_MAX {
            return Err(ClientError::LocalFile {
                action: "uploading",
                path: path.display().to_string(),
                source: std::io::Error::other(format!(
                    "{size} bytes: a media file is 1 to {MEDIA_FILE_BYTES_MAX} bytes"
                )),
            });
        }
        let file_name = if options.file_name.is_empty() {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            options.file_name.clone()
        };
        // Resume when the server still knows the upload and it is the same size.
        let mut state = None;
        if let Some(id) = options.resume_upload_id.filter(|id| *id != 0) {
            match self
                .media_upload_status(v1::MediaUploadStatusRequest { upload_id: id })
                .await
            {
                Ok(s) if s.size_bytes == size => {
                    state = Some((id, s.part_bytes, s.part_count, s.missing_parts));
                }
                Ok(_) => {}
                Err(ClientError::Server {
                    code: v1::ErrorCode::NotFound,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        let (upload_id, part_bytes, part_count, missing) = match state {
            Some(s) => s,
            None => {
                let started = self
                    .media_upload_start(v1::MediaUploadStartRequest {
                        size_bytes: size,
                        mime_type: options.mime_type.clone(),
                        file_name: file_name.clone(),
                        sha256: options
                            .sha256
                            .map_or_else(Bytes::new, |h| Bytes::copy_from_slice(&h)),
                    })
                    .await?;
                if let (Some(existing), Some(h)) = (started.existing, options.sha256) {
                    // Stored already and readable by this user: nothing to send.
                    return Ok(v1::MediaUploadFinishResponse {
                        media: Some(existing),
                        media_id: media_id_hex(&h),
                        deduplicated: true,
                    });
                }
                let all = (0..started.part_count).collect();
                (
                    started.upload_id,
                    started.part_bytes,
                    started.part_count,
                    all,
                )
            }
        };
        if part_bytes == 0 || u64::from(part_count) != size.div_ceil(u64::from(part_bytes)) {
            return Err(ClientError::Protocol(format!(
                "upload {upload_id}: {part_count} parts of {part_bytes} bytes do not make {size} bytes"
            )));
        }
        let missing: BTreeSet<u32> = missing.into_iter().collect();
        let part_len = |i: u32| {
            let start = u64::from(i) * u64::from(part_bytes);
            (size - start).min(u64::from(part_bytes)) as usize
        };
        let mut done: u64 = (0..part_count)
            .filter(|i| !missing.contains(i))
            .map(|i| part_len(i) as u64)
            .sum();
        on_progress(TransferProgress {
            upload_id,
            bytes_done: done,
            bytes_total: size,
        });
        let window = match options.parts_in_flight {
            0 => UPLOAD_PARTS_IN_FLIGHT_MAX,
            n => n.min(UPLOAD_PARTS_IN_FLIGHT_MAX),
        };
        // A hash the caller knows is not computed again.
        let hasher = match options.sha256 {
            Some(_) => None,
            None => Some(Hasher::start(Sha256::new(), window)),
        };
        let mut in_flight: VecDeque<(
            Bytes,
            JoinHandle<Result<v1::MediaUploadPartResponse, ClientError>>,
        )> = VecDeque::new();
        let mut buffers = PartBuffers::default();
        let result: Result<(), ClientError> = async {
            for i in 0..part_count {
                let len = part_len(i);
                if hasher.is_none() && !missing.contains(&i) {
                    // Held by the server and the hash is known: not even read.
                    continue;
                }
                let (data, crc32) = read_part(
                    &file,
                    path,
                    u64::from(i) * u64::from(part_bytes),
                    len,
                    buffers.take(),
                )
                .await?;
                if !missing.contains(&i) {
                    if let Some(hasher) = &hasher {
                        hasher.update(data).await?;
                    }
                    continue;
                }
                if let Some(hasher) = &hasher {
                    hasher.update(data.clone()).await?;
                }
                while in_flight.len() >= window {
                    let (sent, handle) = in_flight.pop_front().expect("non-empty");
                    join_part(handle).await?;
                    done += sent.len() as u64;
                    buffers.give_back(sent);
                    on_progress(TransferProgress {
                        upload_id,
                        bytes_done: done,
                        bytes_total: size,
                    });
                }
                let client = self.clone();
                let request = v1::MediaUploadPartRequest {
                    upload_id,
                    part_index: i,
                    crc32,
                    data: data.clone(),
                };
                in_flight.push_back((
                    data,
                    tokio::spawn(async move { client.media_upload_part(request).await }),
                ));
            }
            while let Some((sent, handle)) = in_flight.pop_front() {
                join_part(handle).await?;
                done += sent.len() as u64;
                on_progress(TransferProgress {
                    upload_id,
                    bytes_done: done,
                    bytes_total: size,
                });
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            for (_, handle) in in_flight {
                handle.abort();
            }
            return Err(e);
        }
        let sha256 = match (hasher, options.sha256) {
            (Some(hasher), _) => hasher.finish().await?,
            (None, Some(known)) => known,
            (None, None) => unreachable!("a hasher runs unless the hash is known"),
        };
        self.media_upload_finish(v1::MediaUploadFinishRequest {
            upload_id,
            sha256: Bytes::copy_from_slice(&sha256),
        })
        .await
    }

    /// Downloads the stored file `sha256` into `path` and returns its size.
    ///
    /// Chunks of [`MEDIA_DOWNLOAD_BYTES_MAX`] are requested with up to
    /// [`DownloadOptions::chunks_in_flight`] in flight and written in order, each checked
    /// against its CRC-32; with [`DownloadCheck::Sha256`], at the end the SHA-256 of the
    /// whole output is checked against the media id. With [`DownloadOptions::resume`],
    /// an existing output file's bytes (whole chunks of it) are kept and only the rest is
    /// fetched; the SHA-256 check then always runs and covers them too, so a damaged
    /// partial file is reported, never returned.
    pub async fn download_file(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        path: &Path,
        options: DownloadOptions,
        mut on_progress: impl FnMut(TransferProgress),
    ) -> Result<u64, ClientError> {
        let size = self.media_size(&sha256).await?;
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .map_err(local("opening", path))?,
        );
        let chunk = u64::from(MEDIA_DOWNLOAD_BYTES_MAX);
        let existing = file.metadata().map_err(local("reading", path))?.len();
        let start = if options.resume {
            (existing.min(size) / chunk) * chunk
        } else {
            0
        };
        file.set_len(start).map_err(local("writing", path))?;
        // Kept bytes are checked by nothing but the whole file's hash.
        let check = if start > 0 {
            DownloadCheck::Sha256
        } else {
            options.check
        };
        let mut hasher = (check == DownloadCheck::Sha256).then(Sha256::new);
        let mut at = 0;
        while let Some(h) = hasher.as_mut()
            && at < start
        {
            let len = (start - at).min(chunk) as usize;
            h.update(read_at(&file, path, at, len).await?);
            at += len as u64;
        }
        on_progress(TransferProgress {
            upload_id: 0,
            bytes_done: start,
            bytes_total: size,
        });
        let out = Arc::clone(&file);
        self.download_chunks(
            sha256,
            size,
            start,
            hasher,
            options.chunks_in_flight,
            move |offset, data| out.write_all_at(data, offset),
            path,
            on_progress,
        )
        .await?;
        file.sync_all().map_err(local("writing", path))?;
        Ok(size)
    }

    /// Downloads the stored file `sha256` and keeps nothing: every chunk is CRC-checked
    /// and, with [`DownloadCheck::Sha256`], the whole is checked against the media id
    /// (hashed on its own thread), as [`Client::download_file`] does, without an output
    /// file. For measuring a server's download path without the client's disk (`chatlog
    /// bench media --sink`), and for checking that a node serves a file intact. Returns
    /// the file's size.
    pub async fn download_checked(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        chunks_in_flight: usize,
        check: DownloadCheck,
        mut on_progress: impl FnMut(TransferProgress),
    ) -> Result<u64, ClientError> {
        let size = self.media_size(&sha256).await?;
        on_progress(TransferProgress {
            upload_id: 0,
            bytes_done: 0,
            bytes_total: size,
        });
        self.download_chunks(
            sha256,
            size,
            0,
            (check == DownloadCheck::Sha256).then(Sha256::new),
            chunks_in_flight,
            |_, _| Ok(()),
            Path::new("(no output file)"),
            on_progress,
        )
        .await?;
        Ok(size)
    }

    async fn media_size(&self, sha256: &[u8; MEDIA_SHA256_BYTES]) -> Result<u64, ClientError> {
        let info = self
            .media_info(v1::MediaInfoRequest {
                sha256: Bytes::copy_from_slice(sha256),
            })
            .await?;
        Ok(info.media.map(|m| m.size_bytes).unwrap_or(0))
    }

    /// Fetches bytes `start..size` of `sha256` in chunks, a bounded number in flight,
    /// checks each chunk's CRC-32, hands them in order to `write` (with the SHA-256,
    /// seeded with `hasher` for the bytes before `start`, on one blocking-pool thread),
    /// and, when there is a `hasher`, checks the whole file's hash against `sha256`.
    #[allow(clippy::too_many_arguments)]
    async fn download_chunks(
        &self,
        sha256: [u8; MEDIA_SHA256_BYTES],
        size: u64,
        start: u64,
        hasher: Option<Sha256>,
        chunks_in_flight: usize,
        mut write: impl FnMut(u64, &[u8]) -> std::io::Result<()> + Send + 'static,
        path: &Path,
        mut on_progress: impl FnMut(TransferProgress),
    ) -> Result<(), ClientError> {
        let chunk = u64::from(MEDIA_DOWNLOAD_BYTES_MAX);
        let window = match chunks_in_flight {
            0 => DOWNLOAD_IN_FLIGHT_MAX,
            n => n.min(DOWNLOAD_IN_FLIGHT_MAX),
        };
        let mut in_flight: VecDeque<(
            u64,
            JoinHandle<Result<v1::MediaDownloadResponse, ClientError>>,
        )> = VecDeque::new();
        let mut next = start;
        let mut written = start;
        // One writer on the blocking pool hashes and writes the checked chunks in order,
        // while this task keeps receiving; the channel holds at most `window` chunks.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(window);
        let writer = {
            let mut h = hasher;
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<Sha256>> {
                while let Some((offset, data)) = rx.blocking_recv() {
                    if let Some(h) = h.as_mut() {
                        h.update(&data);
                    }
                    write(offset, &data)?;
                }
                Ok(h)
            })
        };
        let result: Result<(), ClientError> = async {
            while written < size {
                while next < size && in_flight.len() < window {
                    let client = self.clone();
                    let request = v1::MediaDownloadRequest {
                        sha256: Bytes::copy_from_slice(&sha256),
                        offset: next,
                        length: (size - next).min(chunk) as u32,
                    };
                    in_flight.push_back((
                        next,
                        tokio::spawn(async move { client.media_download(request).await }),
                    ));
                    next += chunk;
                }
                let (offset, handle) = in_flight.pop_front().expect("requests in flight");
                let got = handle
                    .await
                    .map_err(|e| ClientError::Protocol(format!("download task failed: {e}")))??;
                let want = (size - offset).min(chunk) as usize;
                if got.offset != offset || got.data.len() != want {
                    return Err(ClientError::Protocol(format!(
                        "asked {want} bytes at {offset}, got {} at {}",
                        got.data.len(),
                        got.offset
                    )));
                }
                if crc32fast::hash(&got.data) != got.crc32 {
                    return Err(ClientError::Protocol(format!(
                        "chunk at offset {offset} fails its CRC-32"
                    )));
                }
                if tx.send((offset, got.data)).await.is_err() {
                    // The writer stopped on an error, reported below.
                    break;
                }
                written += want as u64;
                on_progress(TransferProgress {
                    upload_id: 0,
                    bytes_done: written,
                    bytes_total: size,
                });
            }
            Ok(())
        }
        .await;
        drop(tx);
        let written_out = writer
            .await
            .map_err(|e| ClientError::Protocol(format!("file writer task failed: {e}")));
        if let Err(e) = result {
            for (_, handle) in in_flight {
                handle.abort();
            }
            return Err(e);
        }
        let hasher = written_out?.map_err(local("writing", path))?;
        if let Some(hasher) = hasher
            && hasher.finalize()[..] != sha256[..]
        {
            return Err(ClientError::Protocol(format!(
                "downloaded file {} does not hash to {}",
                path.display(),
                media_id_hex(&sha256)
            )));
        }
        Ok(())
    }
}

async fn join_part(
    handle: JoinHandle<Result<v1::MediaUploadPartResponse, ClientError>>,
) -> Result<v1::MediaUploadPartResponse, ClientError> {
    handle
        .await
        .map_err(|e| ClientError::Protocol(format!("upload task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ids_round_trip_and_bad_ones_are_refused() {
        let h = [0xab; 32];
        let id = media_id_hex(&h);
        assert_eq!(id.len(), 64);
        assert_eq!(parse_media_id(&id), Some(h));
        assert_eq!(parse_media_id(&id[1..]), None);
        assert_eq!(parse_media_id(&format!("{}zz", &id[2..])), None);
        assert_eq!(parse_media_id(&"é".repeat(32)), None);
    }
}
