//! The node's media store: resumable uploads and content-addressed files on local disk.
//!
//! What it owns: the files under `DATA_DIR/media/` and their bytes — one preallocated file
//! per upload in progress (`uploads/{upload id:016x}`), parts written at their offsets
//! and made durable (fdatasync) before they are acknowledged, the per-part CRC records
//! that let a restart know which parts are present, finishing (SHA-256 check, rename to
//! `files/{sha256 hex}` or, when that file exists, dropping the upload: dedupe), checked
//! reads of finished files through mmap, and expiry of abandoned uploads. What it must
//! not do: decide who may read what (the service does, from the Raft state), talk to
//! the network, or hold a file's bytes in memory beyond one part per request.
//!
//! # File format (uploads and finished files alike), little-endian
//!
//! ```text
//! [0, 4096)             header: magic "CHLGMED1" | version u32 (= 1) | flags u32 (= 0)
//!                       | upload_id u64 | uploader u64 | size u64 | part_bytes u32
//!                       | created_ms u64 | mime len u32 | mime | name len u32 | name
//!                       | zeros … | header CRC-32 u32 at 4092 (over bytes 0..4092)
//! [4096, 4096 + size)   the content; part i at 4096 + i × part_bytes
//! [slots, slots + 16p)  one 16-byte slot per part, slots = 4096 + size rounded up to 4 KiB:
//!                       part CRC-32 u32 | part index u32 | slot CRC-32 u32 (over the
//!                       first 8 bytes, salted) | zero u32
//! ```
//!
//! A slot is valid when its CRC checks and its index is its position; an all-zero
//! (never written) slot never checks. Writing part i is: `pwrite` the bytes, `pwrite`
//! its slot, start their writeback (`sync_file_range`, a hint), `fdatasync`, then
//! acknowledge (parts written at the same time share one
//! `fdatasync` started after all their `pwrite`s: a group commit). The whole file is `fallocate`d when the
//! upload starts, so a full disk shows then (`RESOURCE_EXHAUSTED`), not mid-upload;
//! should a write still fail for space, the part is refused the same way and stays
//! missing. What the disk promises is only what an acknowledged fdatasync covered: after
//! a crash a slot may be durable while its part's bytes are not (they were never
//! acknowledged), so loading an upload after a restart checks each slotted part's bytes
//! against the slot's CRC and drops those that fail; they are reported missing again.
//!
//! Finishing renames the upload file, unchanged, to `files/{sha256 hex}` and syncs
//! both directories: the slots stay as the finished file's per-part CRCs, and every read
//! of a finished file checks the CRC of each part it touches. A read of a range that is
//! not one whole part checks a private copy of each part (what was checked is what is
//! returned, with a CRC computed from it); a read of one whole part, what downloads ask,
//! checks the mapped bytes and answers with a slice of the mapping and the slot's CRC,
//! which the reader checks again ([`StoredFile::read_shared`] says why that is safe).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chatlog_wire::limits::{
    MEDIA_FILE_BYTES_MAX, MEDIA_FILE_NAME_BYTES_MAX, MEDIA_MIME_TYPE_BYTES_MAX, MEDIA_PART_BYTES,
    MEDIA_SHA256_BYTES,
};
use memmap2::Mmap;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Bytes of the header region at the start of every media file.
pub const HEADER_BYTES: u64 = 4096;
/// Bytes of one part slot.
pub const SLOT_BYTES: u64 = 16;
/// Magic at the start of every media file.
pub const MAGIC: &[u8; 8] = b"CHLGMED1";
/// Version of the media file format.
pub const FORMAT_VERSION: u32 = 1;
/// Salt of the slot CRC, so that bytes of content copied into the slot table by a bug
/// cannot pass for a slot.
const SLOT_CRC_SALT: u32 = 0x4d45_4431;

/// Default for [`StoreConfig::upload_ttl`]: an upload not finished within a day is
/// abandoned (Telegram keeps unfinished uploads about as long).
pub const UPLOAD_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Default for [`StoreConfig::uploads_per_user_max`]: a client uploads a few files at
/// once (an album); more in progress from one user is a leak or an attack, and each
/// holds its whole size reserved on disk.
pub const UPLOADS_PER_USER_MAX: usize = 16;
/// Default for [`StoreConfig::reserved_bytes_max`]: bytes all uploads in progress on this
/// node may reserve together: 64 GiB, sixteen maximal files, so abandoned uploads cannot
/// fill the disk before they expire.
pub const RESERVED_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Free space kept on the disk when an upload reserves its file: the message log must
/// never be starved by media.
pub const DISK_FREE_BYTES_MIN: u64 = 256 * 1024 * 1024;
/// Bytes of parts held in memory on this node after they were written, waiting for the
/// upload's running SHA-256 to reach them (parts in flight together finish out of order;
/// without these the hasher reads each such part back from the file: one more copy and
/// CRC pass per part). 64 MiB: 128 parts, several uploads' worth of parts in flight; past
/// it a part is read back as before, so the bound costs speed, never correctness.
pub const HASH_AHEAD_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Most finished files kept open (mapped) at once; beyond, the least recently opened is
/// closed (it is re-opened on its next read).
pub const OPEN_FILES_MAX: usize = 256;

/// Limits and timing of one store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Unfinished uploads are deleted this long after they started.
    pub upload_ttl: Duration,
    /// Uploads in progress per user.
    pub uploads_per_user_max: usize,
    /// Bytes reserved by all uploads in progress.
    pub reserved_bytes_max: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            upload_ttl: UPLOAD_TTL,
            uploads_per_user_max: UPLOADS_PER_USER_MAX,
            reserved_bytes_max: RESERVED_BYTES_MAX,
        }
    }
}

/// What went wrong, typed so the service maps each to a protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A field is invalid (size, part index or length, CRC, hash mismatch).
    #[error("{0}")]
    BadRequest(String),
    /// No such upload (for this user) or stored file.
    #[error("{0}")]
    NotFound(String),
    /// A part re-sent with other bytes than the part already held.
    #[error("{0}")]
    Conflict(String),
    /// Out of disk space or over an upload limit; nothing half-done became visible.
    #[error("{0}")]
    ResourceExhausted(String),
    /// An I/O failure other than a full disk.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Bytes read from disk failed their check; the file is not served.
    #[error("corrupt media file {path}: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MediaError {
    let path = path.display().to_string();
    move |source| {
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) {
            MediaError::ResourceExhausted(format!("{action} {path}: the disk is full ({source})"))
        } else {
            MediaError::Io {
                action,
                path,
                source,
            }
        }
    }
}

/// A file's description as its header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The upload that wrote the file.
    pub upload_id: u64,
    /// Who uploaded it.
    pub uploader: u64,
    /// Content bytes.
    pub size: u64,
    /// Bytes of every part but the last.
    pub part_bytes: u32,
    /// When the upload started (ms since the epoch).
    pub created_ms: u64,
    /// MIME type.
    pub mime_type: String,
    /// File name for people.
    pub file_name: String,
}

impl Header {
    /// Number of parts.
    pub fn part_count(&self) -> u32 {
        self.size.div_ceil(u64::from(self.part_bytes)) as u32
    }

    /// Bytes of part `i`.
    pub fn part_len(&self, i: u32) -> usize {
        let start = u64::from(i) * u64::from(self.part_bytes);
        (self.size - start).min(u64::from(self.part_bytes)) as usize
    }

    /// File offset of the slot table.
    fn slots_offset(&self) -> u64 {
        HEADER_BYTES + self.size.next_multiple_of(4096)
    }

    /// Total file length.
    fn file_len(&self) -> u64 {
        self.slots_offset() + SLOT_BYTES * u64::from(self.part_count())
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.upload_id.to_le_bytes());
        b.extend_from_slice(&self.uploader.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.part_bytes.to_le_bytes());
        b.extend_from_slice(&self.created_ms.to_le_bytes());
        for s in [&self.mime_type, &self.file_name] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b.resize(HEADER_BYTES as usize - 4, 0);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_BYTES as usize {
            return Err(format!("header is {} bytes, not {HEADER_BYTES}", b.len()));
        }
        let b = &b[..HEADER_BYTES as usize];
        let crc = u32::from_le_bytes(b[4092..].try_into().expect("4 bytes"));
        if crc32fast::hash(&b[..4092]) != crc {
            return Err("header CRC mismatch".into());
        }
        if &b[..8] != MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != FORMAT_VERSION {
            return Err(format!("format version {}", u32_at(8)));
        }
        let mut at = 52;
        let mut text = |max: u32| -> Result<String, String> {
            let len = u32_at(at);
            if len > max || at + 4 + len as usize > 4092 {
                return Err(format!("text of {len} bytes in the header"));
            }
            let s = std::str::from_utf8(&b[at + 4..at + 4 + len as usize])
                .map_err(|_| "text in the header is not UTF-8".to_string())?
                .to_string();
            at += 4 + len as usize;
            Ok(s)
        };
        let mime_type = text(MEDIA_MIME_TYPE_BYTES_MAX)?;
        let file_name = text(MEDIA_FILE_NAME_BYTES_MAX)?;
        let h = Header {
            upload_id: u64_at(16),
            uploader: u64_at(24),
            size: u64_at(32),
            part_bytes: u32_at(40),
            created_ms: u64_at(44),
            mime_type,
            file_name,
        };
        if h.size == 0 || h.size > MEDIA_FILE_BYTES_MAX || h.part_bytes == 0 {
            return Err(format!("size {} / part size {}", h.size, h.part_bytes));
        }
        Ok(h)
    }
}

fn slot_bytes(part: u32, crc: u32) -> [u8; SLOT_BYTES as usize] {
    let mut s = [0u8; SLOT_BYTES as usize];
    s[..4].copy_from_slice(&crc.to_le_bytes());
    s[4..8].copy_from_slice(&part.to_le_bytes());
    let check = crc32fast::hash(&s[..8]) ^ SLOT_CRC_SALT;
    s[8..12].copy_from_slice(&check.to_le_bytes());
    s
}

/// The part CRC a slot records, when the slot is valid for part `part`.
fn slot_crc(s: &[u8], part: u32) -> Option<u32> {
    let crc = u32::from_le_bytes(s[..4].try_into().ok()?);
    let index = u32::from_le_bytes(s[4..8].try_into().ok()?);
    let check = u32::from_le_bytes(s[8..12].try_into().ok()?);
    (index == part && check == crc32fast::hash(&s[..8]) ^ SLOT_CRC_SALT).then_some(crc)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The 64 lowercase hex digits of a hash.
pub fn hex(sha256: &[u8; MEDIA_SHA256_BYTES]) -> String {
    chatlog_wire::client::media_id_hex(sha256)
}

#[derive(Debug)]
struct UploadState {
    /// Part CRCs held durably (`None`: missing).
    parts: Vec<Option<u32>>,
    /// Held parts not hashed yet whose bytes are still in memory (CRC-checked on
    /// receipt), within the node's [`HASH_AHEAD_BYTES_MAX`]; the hasher takes them
    /// instead of reading the part back.
    ahead: std::collections::BTreeMap<u32, Bytes>,
    /// Set once finish moved the file away: parts are refused from then on.
    finished: bool,
}

/// The SHA-256 of an upload's longest prefix of held parts, advanced as parts arrive, so
/// finishing hashes only what is left instead of the whole file.
struct Hashing {
    sha: Sha256,
    /// The first part not hashed yet.
    next: u32,
}

impl std::fmt::Debug for Hashing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hashing").field("next", &self.next).finish()
    }
}

impl Hashing {
    fn new() -> Mutex<Hashing> {
        Mutex::new(Hashing {
            sha: Sha256::new(),
            next: 0,
        })
    }
}

/// The group commit of an upload's parts: writes are numbered as they finish their
/// `pwrite`s, and one `fdatasync` covers every write numbered before it started, so parts
/// in flight together share a sync instead of queueing one sync each behind the journal.
#[derive(Debug, Default)]
struct SyncState {
    /// Writes numbered so far.
    written: u64,
    /// Every write up to this number is durable.
    synced: u64,
    /// Writes up to this number were covered by an fdatasync that failed.
    failed_through: u64,
    /// An fdatasync is running.
    syncing: bool,
}

/// An upload in progress.
#[derive(Debug)]
pub struct Upload {
    /// Its description.
    pub header: Header,
    path: PathBuf,
    file: File,
    state: Mutex<UploadState>,
    /// Held while finishing, so two finishes of one upload do not race.
    finishing: tokio::sync::Mutex<()>,
    /// Held around a part's `pwrite`s. The kernel writes one file's pages one writer at a
    /// time anyway (ext4 takes the inode lock for a buffered write), but its waiters spin
    /// on that lock while its owner copies: with 64 parts in flight, up to 14% of the
    /// server's upload CPU went to `rwsem_spin_on_owner` (`perf`, session 9), taken
    /// from the SHA-256 and the socket. Waiters here sleep instead.
    writing: Mutex<()>,
    hashing: Mutex<Hashing>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    /// The node's bytes of parts held ahead of hashing ([`HASH_AHEAD_BYTES_MAX`]).
    ahead_bytes: Arc<AtomicU64>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let held: usize = st.ahead.values().map(Bytes::len).sum();
        self.ahead_bytes.fetch_sub(held as u64, Ordering::Relaxed);
    }
}

impl Upload {
    /// Makes durable every byte written before this call (group commit, [`SyncState`]).
    /// Blocking.
    fn sync_written(&self) -> Result<(), MediaError> {
        let mut st = lock(&self.sync);
        st.written += 1;
        let ticket = st.written;
        loop {
            if st.failed_through >= ticket {
                return Err(MediaError::Io {
                    action: "syncing",
                    path: self.path.display().to_string(),
                    source: io::Error::other("an fdatasync covering this part failed"),
                });
            }
            if st.synced >= ticket {
                return Ok(());
            }
            if !st.syncing {
                st.syncing = true;
                let target = st.written;
                drop(st);
                let result = self.file.sync_data();
                st = lock(&self.sync);
                st.syncing = false;
                match &result {
                    Ok(()) => st.synced = st.synced.max(target),
                    Err(_) => st.failed_through = st.failed_through.max(target),
                }
                self.synced.notify_all();
                return result.map_err(io_error("syncing", &self.path));
            }
            st = self.synced.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Parts not held, ascending.
    pub fn missing(&self) -> Vec<u32> {
        let st = lock(&self.state);
        (0..self.header.part_count())
            .filter(|i| st.parts[*i as usize].is_none())
            .collect()
    }

    /// Parts held.
    pub fn held(&self) -> u32 {
        lock(&self.state)
            .parts
            .iter()
            .filter(|p| p.is_some())
            .count() as u32
    }
}

/// A finished file, mapped.
#[derive(Debug)]
pub struct StoredFile {
    /// Its description (from its first upload).
    pub header: Header,
    /// The media id's hash.
    pub sha256: [u8; MEDIA_SHA256_BYTES],
    path: PathBuf,
    map: Mmap,
}

impl StoredFile {
    /// Reads `len` bytes at `offset` (cut at the end of the file), after checking the
    /// CRC of every part the range touches, on a private copy; with the CRC-32 of the
    /// bytes returned.
    pub fn read(&self, offset: u64, len: usize) -> Result<(Vec<u8>, u32), MediaError> {
        let h = &self.header;
        if offset >= h.size || len == 0 {
            return Err(MediaError::BadRequest(format!(
                "range at {offset} of {len} bytes is outside the file's {} bytes",
                h.size
            )));
        }
        let end = (offset + len as u64).min(h.size);
        let pb = u64::from(h.part_bytes);
        let first = (offset / pb) as u32;
        let last = ((end - 1) / pb) as u32;
        let corrupt = |detail: String| MediaError::Corrupt {
            path: self.path.display().to_string(),
            detail,
        };
        // Aligned to one part (the common case): the checked copy is the answer.
        let mut out = Vec::with_capacity((end - offset) as usize);
        for part in first..=last {
            let start = HEADER_BYTES + u64::from(part) * pb;
            let plen = h.part_len(part);
            let s = (h.slots_offset() + SLOT_BYTES * u64::from(part)) as usize;
            let want = self
                .map
                .get(s..s + SLOT_BYTES as usize)
                .and_then(|slot| slot_crc(slot, part))
                .ok_or_else(|| corrupt(format!("slot of part {part} fails its check")))?;
            let bytes = self
                .map
                .get(start as usize..start as usize + plen)
                .ok_or_else(|| corrupt(format!("part {part} is beyond the file's end")))?;
            let part_start = u64::from(part) * pb;
            let from = offset.max(part_start) - part_start;
            let to = end.min(part_start + plen as u64) - part_start;
            if from == 0 && to == plen as u64 && first == last {
                out.extend_from_slice(bytes);
                if crc32fast::hash(&out) != want {
                    return Err(corrupt(format!("part {part} fails its CRC")));
                }
                // A whole part: its checked CRC is the answer's.
                return Ok((out, want));
            } else {
                let copy = bytes.to_vec();
                if crc32fast::hash(&copy) != want {
                    return Err(corrupt(format!("part {part} fails its CRC")));
                }
                out.extend_from_slice(&copy[from as usize..to as usize]);
            }
        }
        let crc = crc32fast::hash(&out);
        Ok((out, crc))
    }

    /// [`StoredFile::read`] without the copy when the range is one whole part (what a
    /// client's download asks, chunk by chunk): the answer is a slice of the mapped file
    /// itself, which stays mapped while the answer lives, with the part's CRC from its
    /// slot after a check of the mapped bytes against it. Any other range is read as
    /// [`StoredFile::read`] reads it.
    ///
    /// Why serving the mapped bytes after checking them is safe: the CRC returned is the
    /// slot's, never one computed from the bytes sent, and the client checks every chunk
    /// against it (then the whole file against its SHA-256). Finished files are never
    /// written (module docs), so the mapped bytes only change if the disk or someone
    /// outside the node changes the file between the check and the socket write; the
    /// client then sees a CRC mismatch, never wrong bytes passing as checked. The private
    /// copy of [`StoredFile::read`] would only move that detection from the client to
    /// the server. A range that is not a whole part keeps the copy: its CRC is computed
    /// from the bytes returned, so they must be the bytes that were checked.
    pub fn read_shared(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
    ) -> Result<(Bytes, u32), MediaError> {
        let h = &self.header;
        let pb = u64::from(h.part_bytes);
        if !offset.is_multiple_of(pb) || offset >= h.size {
            return self.read(offset, len).map(|(v, crc)| (Bytes::from(v), crc));
        }
        let part = (offset / pb) as u32;
        let plen = h.part_len(part);
        if (offset + len as u64).min(h.size) != offset + plen as u64 {
            return self.read(offset, len).map(|(v, crc)| (Bytes::from(v), crc));
        }
        let corrupt = |detail: String| MediaError::Corrupt {
            path: self.path.display().to_string(),
            detail,
        };
        let s = (h.slots_offset() + SLOT_BYTES * u64::from(part)) as usize;
        let want = self
            .map
            .get(s..s + SLOT_BYTES as usize)
            .and_then(|slot| slot_crc(slot, part))
            .ok_or_else(|| corrupt(format!("slot of part {part} fails its check")))?;
        let start = (HEADER_BYTES + offset) as usize;
        let bytes = self
            .map
            .get(start..start + plen)
            .ok_or_else(|| corrupt(format!("part {part} is beyond the file's end")))?;
        if crc32fast::hash(bytes) != want {
            return Err(corrupt(format!("part {part} fails its CRC")));
        }
        let mapped = MappedRange {
            file: Arc::clone(self),
            start,
            len: plen,
        };
        Ok((Bytes::from_owner(mapped), want))
    }
}

/// A range of a finished file's mapping, owning a reference to the file so the mapping
/// outlives every answer that points into it.
struct MappedRange {
    file: Arc<StoredFile>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        &self.file.map[self.start..self.start + self.len]
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What finishing an upload produced.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The stored file's description.
    pub header: Header,
    /// Its hash.
    pub sha256: [u8; MEDIA_SHA256_BYTES],
    /// True when the content was stored before and this upload was dropped.
    pub deduplicated: bool,
}

/// A mapped finished file and the tick it was last opened at (for closing the oldest).
type OpenFile = (u64, Arc<StoredFile>);

/// The media store of one node.
#[derive(Debug)]
pub struct MediaStore {
    dir: PathBuf,
    config: StoreConfig,
    uploads: Mutex<HashMap<u64, Arc<Upload>>>,
    /// Finished files open for reading, with the tick they were last opened at.
    open: Mutex<HashMap<[u8; MEDIA_SHA256_BYTES], OpenFile>>,
    open_tick: std::sync::atomic::AtomicU64,
    /// Held while an upload forwarded by a peer is created, so the parts of one new
    /// upload arriving at once create it once.
    creating: Mutex<()>,
    /// Uploads a fetch from peer replicas is filling (`fetch.rs`): their `created_ms` is
    /// the original upload's, so expiry must not take them while the fetch runs.
    pinned: Mutex<HashSet<u64>>,
    /// Bytes of parts held in memory ahead of their upload's hashing, all uploads
    /// together ([`HASH_AHEAD_BYTES_MAX`]).
    ahead_bytes: Arc<AtomicU64>,
}

impl MediaStore {
    /// Opens (creating) the store under `dir` and loads every upload in progress, checking
    /// each held part's bytes against its slot (module docs). Blocking.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<MediaStore, MediaError> {
        for sub in ["uploads", "files"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_error("creating", &p))?;
        }
        let store = MediaStore {
            dir: dir.to_path_buf(),
            config,
            uploads: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            open_tick: Default::default(),
            creating: Mutex::new(()),
            pinned: Mutex::new(HashSet::new()),
            ahead_bytes: Arc::default(),
        };
        let updir = dir.join("uploads");
        let entries = std::fs::read_dir(&updir).map_err(io_error("listing", &updir))?;
        for entry in entries {
            let entry = entry.map_err(io_error("listing", &updir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| u64::from_str_radix(n, 16).ok())
                .filter(|id| *id != 0)
            else {
                // A temporary or foreign file: not ours to judge; leave it.
                continue;
            };
            match load_upload(&path, Arc::clone(&store.ahead_bytes)) {
                Ok(u) if u.header.upload_id == id => {
                    lock(&store.uploads).insert(id, Arc::new(u));
                }
                Ok(_) | Err(_) => {
                    // A header that does not check was never acknowledged to anyone (the
                    // header is synced before the upload id is returned): remove it.
                    tracing::warn!(path = %path.display(), "dropping an unreadable upload file");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(store)
    }

    /// The store's limits and timing.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn upload_path(&self, id: u64) -> PathBuf {
        self.dir.join("uploads").join(format!("{id:016x}"))
    }

    /// Path of the finished file named by `sha256`.
    pub fn file_path(&self, sha256: &[u8; MEDIA_SHA256_BYTES]) -> PathBuf {
        self.dir.join("files").join(hex(sha256))
    }

    /// Starts an upload: checks the limits, creates and preallocates its file, writes
    /// and syncs its header. Blocking.
    pub fn start(
        &self,
        uploader: u64,
        size: u64,
        mime_type: &str,
        file_name: &str,
        now_ms: u64,
    ) -> Result<Arc<Upload>, MediaError> {
        if size == 0 || size > MEDIA_FILE_BYTES_MAX {
            return Err(MediaError::BadRequest(format!(
                "file size {size}: a media file is 1 to {MEDIA_FILE_BYTES_MAX} bytes"
            )));
        }
        let header = {
            let uploads = lock(&self.uploads);
            let mine = uploads
                .values()
                .filter(|u| u.header.uploader == uploader)
                .count();
            if mine >= self.config.uploads_per_user_max {
                return Err(MediaError::ResourceExhausted(format!(
                    "user {uploader} has {mine} uploads in progress, the most allowed; \
                     finish one or let it expire"
                )));
            }
            let reserved: u64 = uploads.values().map(|u| u.header.size).sum();
            if reserved + size > self.config.reserved_bytes_max {
                return Err(MediaError::ResourceExhausted(format!(
                    "uploads in progress reserve {reserved} bytes; {size} more would pass \
                     the node's limit of {}",
                    self.config.reserved_bytes_max
                )));
            }
            let mut id = 0;
            while id == 0 || uploads.contains_key(&id) {
                id = rand::rng().next_u64();
            }
            Header {
                upload_id: id,
                uploader,
                size,
                part_bytes: MEDIA_PART_BYTES,
                created_ms: now_ms,
                mime_type: mime_type.to_string(),
                file_name: file_name.to_string(),
            }
        };
        let upload = self.create_upload(header)?;
        lock(&self.uploads).insert(upload.header.upload_id, Arc::clone(&upload));
        Ok(upload)
    }

    /// Creates an upload's file from its header (the id chosen by this node, or by the
    /// node that forwarded a part). Blocking.
    fn create_upload(&self, header: Header) -> Result<Arc<Upload>, MediaError> {
        let path = self.upload_path(header.upload_id);
        let free = disk_free_bytes(&self.dir);
        if let Some(free) = free
            && free < header.file_len() + DISK_FREE_BYTES_MIN
        {
            return Err(MediaError::ResourceExhausted(format!(
                "{} bytes free on the media disk, {} needed plus {DISK_FREE_BYTES_MIN} kept free",
                free,
                header.file_len()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("creating", &path))?;
        let result = (|| {
            preallocate(&file, header.file_len())
                .map_err(io_error("reserving space for", &path))?;
            file.write_all_at(&header.encode(), 0)
                .map_err(io_error("writing", &path))?;
            file.sync_all().map_err(io_error("syncing", &path))?;
            sync_dir(&self.dir.join("uploads"))
        })();
        if let Err(e) = result {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let parts = vec![None; header.part_count() as usize];
        Ok(Arc::new(Upload {
            header,
            path,
            file,
            state: Mutex::new(UploadState {
                parts,
                ahead: Default::default(),
                finished: false,
            }),
            finishing: tokio::sync::Mutex::new(()),
            writing: Mutex::new(()),
            hashing: Hashing::new(),
            sync: Mutex::default(),
            synced: Condvar::new(),
            ahead_bytes: Arc::clone(&self.ahead_bytes),
        }))
    }

    /// The upload `id` of `uploader` (`None` for another user's: not visible).
    pub fn upload(&self, uploader: u64, id: u64) -> Option<Arc<Upload>> {
        lock(&self.uploads)
            .get(&id)
            .filter(|u| u.header.uploader == uploader)
            .cloned()
    }

    /// An upload by id alone, creating it from `header` when this node does not have it
    /// (a part forwarded by another node of the group). Blocking.
    pub fn upload_or_create(&self, header: Header) -> Result<Arc<Upload>, MediaError> {
        let _creating = lock(&self.creating);
        if let Some(u) = lock(&self.uploads).get(&header.upload_id) {
            if u.header != header {
                return Err(MediaError::Conflict(format!(
                    "upload {:016x} exists here with another description",
                    header.upload_id
                )));
            }
            return Ok(Arc::clone(u));
        }
        if header.size == 0
            || header.size > MEDIA_FILE_BYTES_MAX
            || header.part_bytes != MEDIA_PART_BYTES
        {
            return Err(MediaError::BadRequest("bad forwarded upload header".into()));
        }
        let upload = self.create_upload(header.clone())?;
        lock(&self.uploads)
            .entry(header.upload_id)
            .or_insert(upload.clone());
        Ok(upload)
    }

    /// Writes part `part` and makes it durable; returns the parts now held. A part held
    /// already is acknowledged again if its CRC matches. Blocking (write + fdatasync).
    pub fn write_part(
        &self,
        upload: &Upload,
        part: u32,
        crc32: u32,
        data: &[u8],
    ) -> Result<u32, MediaError> {
        self.write_part_kept(upload, part, crc32, data, None)
    }

    /// [`MediaStore::write_part`] of bytes the caller holds shared, without hashing: the
    /// part's bytes are kept (within [`HASH_AHEAD_BYTES_MAX`]) for the upload's running
    /// hash to take from memory instead of reading them back; the caller runs
    /// [`MediaStore::hash_ahead`] once the part is acknowledged.
    pub fn write_part_bytes(
        &self,
        upload: &Upload,
        part: u32,
        crc32: u32,
        data: &Bytes,
    ) -> Result<u32, MediaError> {
        self.write_part_kept(upload, part, crc32, data, Some(data))
    }

    fn write_part_kept(
        &self,
        upload: &Upload,
        part: u32,
        crc32: u32,
        data: &[u8],
        keep: Option<&Bytes>,
    ) -> Result<u32, MediaError> {
        let h = &upload.header;
        if part >= h.part_count() {
            return Err(MediaError::BadRequest(format!(
                "part {part} is out of range: the upload has parts 0 to {}",
                h.part_count() - 1
            )));
        }
        if data.len() != h.part_len(part) {
            return Err(MediaError::BadRequest(format!(
                "part {part} is {} bytes, must be {}",
                data.len(),
                h.part_len(part)
            )));
        }
        if crc32fast::hash(data) != crc32 {
            return Err(MediaError::BadRequest(format!(
                "part {part} does not match its CRC-32 {crc32:#010x}: nothing stored"
            )));
        }
        {
            let st = lock(&upload.state);
            if st.finished {
                return Err(MediaError::NotFound(format!(
                    "upload {:016x} is finished",
                    h.upload_id
                )));
            }
            match st.parts[part as usize] {
                Some(held) if held == crc32 => {
                    return Ok(st.parts.iter().filter(|p| p.is_some()).count() as u32);
                }
                Some(_) => {
                    return Err(MediaError::Conflict(format!(
                        "part {part} is held with other bytes; an upload's parts do not change"
                    )));
                }
                None => {}
            }
        }
        let at = HEADER_BYTES + u64::from(part) * u64::from(h.part_bytes);
        let path = &upload.path;
        {
            let _writing = lock(&upload.writing);
            upload
                .file
                .write_all_at(data, at)
                .map_err(io_error("writing", path))?;
            upload
                .file
                .write_all_at(
                    &slot_bytes(part, crc32),
                    h.slots_offset() + SLOT_BYTES * u64::from(part),
                )
                .map_err(io_error("writing", path))?;
        }
        // Start the part's writeback now, without waiting for it: the group's fdatasync
        // then finds these pages on their way to the disk (or there) instead of starting
        // all of a group's pages at once, so the disk works while the next parts arrive
        // and are written, not only during the syncs. A hint: only the fdatasync below
        // makes the part durable, and only then is it acknowledged.
        start_writeback(&upload.file, at, data.len());
        upload.sync_written()?;
        let held = {
            let mut st = lock(&upload.state);
            st.parts[part as usize] = Some(crc32);
            if let Some(bytes) = keep {
                let n = bytes.len() as u64;
                // Taken back by the hasher, or by the upload's drop.
                if self.ahead_bytes.fetch_add(n, Ordering::Relaxed) + n <= HASH_AHEAD_BYTES_MAX {
                    st.ahead.insert(part, bytes.clone());
                } else {
                    self.ahead_bytes.fetch_sub(n, Ordering::Relaxed);
                }
            }
            st.parts.iter().filter(|p| p.is_some()).count() as u32
        };
        // Bytes kept for the hasher: the caller runs [`MediaStore::hash_ahead`] after
        // acknowledging, off the acknowledgement's path. Otherwise hash on while the
        // bytes are at hand, unless another part's writer is at it.
        if keep.is_none()
            && let Err(e) = advance_hash(upload, Some((part, data)), false)
        {
            tracing::warn!(error = %e, "hashing an upload's parts ahead of its finish");
        }
        Ok(held)
    }

    /// Advances `upload`'s running SHA-256 over the parts held since, taking the bytes
    /// [`MediaStore::write_part_bytes`] kept (or reading them back, CRC-checked), unless
    /// another thread is at it. Callers of `write_part_bytes` run it after the part is
    /// acknowledged, so hashing runs beside the next parts' writes and syncs instead of
    /// delaying an acknowledgement; whatever it leaves, finishing hashes. Blocking.
    pub fn hash_ahead(&self, upload: &Upload) {
        if let Err(e) = advance_hash(upload, None, false) {
            tracing::warn!(error = %e, "hashing an upload's parts ahead of its finish");
        }
    }

    /// Finishes `upload` ([`MediaStore::check`], then [`MediaStore::commit`]). Blocking.
    pub fn finish(
        &self,
        upload: &Upload,
        sha256: &[u8; MEDIA_SHA256_BYTES],
    ) -> Result<Finished, MediaError> {
        self.check(upload, sha256)?;
        self.commit(upload, sha256)
    }

    /// The first half of finishing: every part held, and the content's SHA-256 equal to
    /// `sha256` (each part's CRC checked on the way). A hash mismatch deletes the upload.
    /// Nothing becomes visible. Blocking.
    pub fn check(
        &self,
        upload: &Upload,
        sha256: &[u8; MEDIA_SHA256_BYTES],
    ) -> Result<(), MediaError> {
        let h = &upload.header;
        let crcs: Vec<u32> = {
            let st = lock(&upload.state);
            if st.finished {
                return Err(MediaError::NotFound(format!(
                    "upload {:016x} is finished",
                    h.upload_id
                )));
            }
            let missing = st.parts.iter().filter(|p| p.is_none()).count();
            if missing > 0 {
                return Err(MediaError::BadRequest(format!(
                    "upload {:016x} misses {missing} of {} parts; send them first",
                    h.upload_id,
                    h.part_count()
                )));
            }
            st.parts.iter().map(|p| p.expect("all held")).collect()
        };
        debug_assert_eq!(crcs.len(), h.part_count() as usize);
        // Every part was hashed as it arrived (checked against its CRC on receipt) or is
        // read back now and checked against its slot's CRC; only the rest is hashed here.
        advance_hash(upload, None, true)?;
        let got: [u8; 32] = {
            let hashing = lock(&upload.hashing);
            if hashing.next != h.part_count() {
                return Err(MediaError::Corrupt {
                    path: upload.path.display().to_string(),
                    detail: format!(
                        "hashed {} of {} parts although all are held",
                        hashing.next,
                        h.part_count()
                    ),
                });
            }
            hashing.sha.clone().finalize().into()
        };
        if &got != sha256 {
            self.remove_upload(h.upload_id);
            return Err(MediaError::BadRequest(format!(
                "the upload's content hashes to {}, not {}: the upload is deleted, start again",
                hex(&got),
                hex(sha256)
            )));
        }
        Ok(())
    }

    /// The second half of finishing, after [`MediaStore::check`]: renames the upload
    /// into place or, when the content is stored already, drops it (dedupe). Blocking.
    pub fn commit(
        &self,
        upload: &Upload,
        sha256: &[u8; MEDIA_SHA256_BYTES],
    ) -> Result<Finished, MediaError> {
        let h = &upload.header;
        let path = &upload.path;
        {
            let mut st = lock(&upload.state);
            if st.finished {
                return Err(MediaError::NotFound(format!(
                    "upload {:016x} is finished",
                    h.upload_id
                )));
            }
            st.finished = true;
        }
        let target = self.file_path(sha256);
        let deduplicated = target.exists();
        if deduplicated {
            let _ = std::fs::remove_file(path);
        } else {
            std::fs::rename(path, &target).map_err(io_error("renaming", path))?;
            sync_dir(&self.dir.join("files"))?;
        }
        sync_dir(&self.dir.join("uploads"))?;
        lock(&self.uploads).remove(&h.upload_id);
        let header = match self.file(sha256)? {
            Some(f) => f.header.clone(),
            None => h.clone(),
        };
        Ok(Finished {
            header,
            sha256: *sha256,
            deduplicated,
        })
    }

    /// Deletes an upload and its file.
    pub fn remove_upload(&self, id: u64) {
        if let Some(u) = lock(&self.uploads).remove(&id) {
            {
                let mut st = lock(&u.state);
                st.finished = true;
                let held: usize = std::mem::take(&mut st.ahead).values().map(Bytes::len).sum();
                self.ahead_bytes.fetch_sub(held as u64, Ordering::Relaxed);
            }
            let _ = std::fs::remove_file(&u.path);
        }
    }

    /// Deletes every upload started before `now_ms - ttl`; returns how many.
    pub fn expire(&self, now_ms: u64) -> usize {
        let ttl = self.config.upload_ttl.as_millis() as u64;
        let old: Vec<u64> = lock(&self.uploads)
            .values()
            .filter(|u| u.header.created_ms.saturating_add(ttl) <= now_ms)
            .map(|u| u.header.upload_id)
            .filter(|id| !lock(&self.pinned).contains(id))
            .collect();
        for id in &old {
            tracing::info!(upload = format!("{id:016x}"), "media upload expired");
            self.remove_upload(*id);
        }
        old.len()
    }

    /// Keeps upload `id` from expiring until [`MediaStore::unpin`] (a fetch fills it).
    pub fn pin(&self, id: u64) {
        lock(&self.pinned).insert(id);
    }

    /// Lets upload `id` expire again.
    pub fn unpin(&self, id: u64) {
        lock(&self.pinned).remove(&id);
    }

    /// Uploads in progress and bytes they reserve.
    pub fn uploads_in_progress(&self) -> (usize, u64) {
        let u = lock(&self.uploads);
        (u.len(), u.values().map(|u| u.header.size).sum())
    }

    /// The finished file `sha256` when it is open (mapped) already, without touching
    /// the disk: a lock and a map lookup, so callers on the async runtime use it before
    /// handing [`MediaStore::file`] to the blocking pool (a download asks for the same
    /// file once per chunk; the hand-off cost more than the lookup).
    pub fn file_open(&self, sha256: &[u8; MEDIA_SHA256_BYTES]) -> Option<Arc<StoredFile>> {
        let tick = self
            .open_tick
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut open = lock(&self.open);
        let (t, f) = open.get_mut(sha256)?;
        *t = tick;
        Some(Arc::clone(f))
    }

    /// The finished file `sha256`, opened and mapped (cached), or `None` when this node
    /// does not store it. Blocking on first open.
    pub fn file(
        &self,
        sha256: &[u8; MEDIA_SHA256_BYTES],
    ) -> Result<Option<Arc<StoredFile>>, MediaError> {
        let tick = self
            .open_tick
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((t, f)) = lock(&self.open).get_mut(sha256) {
            *t = tick;
            return Ok(Some(Arc::clone(f)));
        }
        let path = self.file_path(sha256);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("opening", &path)(e)),
        };
        // SAFETY: finished files are never written again; they are only renamed into
        // place whole, and removed by no one while the node runs.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error("mapping", &path))?;
        let header = Header::decode(&map).map_err(|detail| MediaError::Corrupt {
            path: path.display().to_string(),
            detail,
        })?;
        if (map.len() as u64) < header.file_len() {
            return Err(MediaError::Corrupt {
                path: path.display().to_string(),
                detail: format!(
                    "{} bytes, the header needs {}",
                    map.len(),
                    header.file_len()
                ),
            });
        }
        let f = Arc::new(StoredFile {
            header,
            sha256: *sha256,
            path,
            map,
        });
        let mut open = lock(&self.open);
        if open.len() >= OPEN_FILES_MAX
            && let Some(oldest) = open.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| *k)
        {
            open.remove(&oldest);
        }
        open.insert(*sha256, (tick, Arc::clone(&f)));
        Ok(Some(f))
    }
}

/// Extends the upload's running hash over the held parts that follow its prefix: `just`
/// is a part this thread just wrote (hashed from its buffer, checked on receipt), others
/// are read back from the file and checked against their CRC. With `wait` false it
/// returns at once when another thread is hashing (that one carries on). Blocking.
fn advance_hash(upload: &Upload, just: Option<(u32, &[u8])>, wait: bool) -> Result<(), MediaError> {
    let mut hashing = if wait {
        lock(&upload.hashing)
    } else {
        match upload.hashing.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        }
    };
    let h = &upload.header;
    let mut buf = Vec::new();
    while hashing.next < h.part_count() {
        let i = hashing.next;
        let (crc, ahead) = {
            let mut st = lock(&upload.state);
            let Some(crc) = st.parts[i as usize] else {
                break;
            };
            (crc, st.ahead.remove(&i))
        };
        if let Some(b) = &ahead {
            upload
                .ahead_bytes
                .fetch_sub(b.len() as u64, Ordering::Relaxed);
        }
        match (just, ahead) {
            (Some((j, data)), _) if j == i => hashing.sha.update(data),
            // Checked against its CRC on receipt and held in memory since.
            (_, Some(bytes)) => hashing.sha.update(&bytes),
            _ => {
                let len = h.part_len(i);
                buf.resize(len, 0);
                upload
                    .file
                    .read_exact_at(
                        &mut buf,
                        HEADER_BYTES + u64::from(i) * u64::from(h.part_bytes),
                    )
                    .map_err(io_error("reading", &upload.path))?;
                if crc32fast::hash(&buf) != crc {
                    return Err(MediaError::Corrupt {
                        path: upload.path.display().to_string(),
                        detail: format!("part {i} no longer matches its CRC"),
                    });
                }
                hashing.sha.update(&buf);
            }
        }
        hashing.next += 1;
    }
    Ok(())
}

/// Loads an upload file after a restart: header, slots, and each slotted part's bytes
/// checked against its CRC.
fn load_upload(path: &Path, ahead_bytes: Arc<AtomicU64>) -> Result<Upload, MediaError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("opening", path))?;
    let mut hb = vec![0u8; HEADER_BYTES as usize];
    file.read_exact_at(&mut hb, 0)
        .map_err(io_error("reading", path))?;
    let header = Header::decode(&hb).map_err(|detail| MediaError::Corrupt {
        path: path.display().to_string(),
        detail,
    })?;
    let n = header.part_count();
    let mut slots = vec![0u8; (SLOT_BYTES * u64::from(n)) as usize];
    file.read_exact_at(&mut slots, header.slots_offset())
        .map_err(io_error("reading", path))?;
    let mut parts = vec![None; n as usize];
    let mut buf = vec![0u8; header.part_bytes as usize];
    for i in 0..n {
        let s = &slots[(i as usize) * SLOT_BYTES as usize..][..SLOT_BYTES as usize];
        let Some(crc) = slot_crc(s, i) else { continue };
        let len = header.part_len(i);
        file.read_exact_at(
            &mut buf[..len],
            HEADER_BYTES + u64::from(i) * u64::from(header.part_bytes),
        )
        .map_err(io_error("reading", path))?;
        if crc32fast::hash(&buf[..len]) == crc {
            parts[i as usize] = Some(crc);
        }
    }
    Ok(Upload {
        header,
        path: path.to_path_buf(),
        file,
        state: Mutex::new(UploadState {
            parts,
            ahead: Default::default(),
            finished: false,
        }),
        finishing: tokio::sync::Mutex::new(()),
        writing: Mutex::new(()),
        hashing: Hashing::new(),
        sync: Mutex::default(),
        synced: Condvar::new(),
        ahead_bytes,
    })
}

impl Upload {
    /// Serialises finishes of this upload.
    pub async fn finishing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.finishing.lock().await
    }
}

/// Reserves `len` bytes for `file` (`fallocate`), so a full disk shows when an upload
/// starts. Where the file system cannot (EOPNOTSUPP), the length is set instead and a
/// full disk shows as a refused part.
/// Asks the kernel to start writing `len` bytes at `offset` of `file` to the disk
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: asynchronous, no durability promise, no
/// metadata). A failure is ignored: it only means the later fdatasync writes the pages
/// itself, as it did before this hint.
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor we own; it reads no user memory.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor we own.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(len);
    }
    Err(e)
}

/// Bytes available to this user on the file system holding `dir`, if it can be asked.
pub(crate) fn disk_free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn sync_dir(dir: &Path) -> Result<(), MediaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn put_all(store: &MediaStore, up: &Upload, data: &[u8]) {
        for i in 0..up.header.part_count() {
            let s = i as usize * MEDIA_PART_BYTES as usize;
            let part = &data[s..(s + MEDIA_PART_BYTES as usize).min(data.len())];
            store
                .write_part(up, i, crc32fast::hash(part), part)
                .expect("part stored");
        }
    }

    #[test]
    fn parts_survive_reopen_and_finish_checks_hash_and_dedupes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = content(MEDIA_PART_BYTES as usize * 2 + 1234, 7);
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let id;
        {
            let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("opens");
            let up = store
                .start(5, data.len() as u64, "a/b", "f", now_ms())
                .expect("starts");
            id = up.header.upload_id;
            let p1 = &data[MEDIA_PART_BYTES as usize..2 * MEDIA_PART_BYTES as usize];
            store
                .write_part(&up, 1, crc32fast::hash(p1), p1)
                .expect("part 1");
            // Wrong CRC, wrong length, out of range: refused, nothing held.
            assert!(matches!(
                store.write_part(&up, 0, 1, &data[..MEDIA_PART_BYTES as usize]),
                Err(MediaError::BadRequest(_))
            ));
            assert!(matches!(
                store.write_part(&up, 0, crc32fast::hash(&data[..5]), &data[..5]),
                Err(MediaError::BadRequest(_))
            ));
            assert!(matches!(
                store.write_part(&up, 3, crc32fast::hash(&data[..5]), &data[..5]),
                Err(MediaError::BadRequest(_))
            ));
            assert_eq!(up.missing(), vec![0, 2]);
        }
        let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("reopens");
        let up = store.upload(5, id).expect("upload survives");
        assert!(
            store.upload(6, id).is_none(),
            "another user does not see it"
        );
        assert_eq!(up.missing(), vec![0, 2]);
        put_all(&store, &up, &data);
        assert!(matches!(
            store.finish(&up, &[0; 32]),
            Err(MediaError::BadRequest(_))
        ));
        assert!(
            store.upload(5, id).is_none(),
            "a hash mismatch deletes the upload"
        );
        assert!(store.file(&[0; 32]).expect("no error").is_none());
        let up = store
            .start(5, data.len() as u64, "a/b", "f", now_ms())
            .expect("starts");
        put_all(&store, &up, &data);
        let f = store.finish(&up, &sha).expect("finishes");
        assert!(!f.deduplicated);
        let file = store.file(&sha).expect("reads").expect("stored");
        let read = |o: u64, l: usize| {
            let (bytes, crc) = file.read(o, l).expect("reads");
            assert_eq!(crc, crc32fast::hash(&bytes));
            bytes
        };
        assert_eq!(read(0, data.len()), data);
        let pb = MEDIA_PART_BYTES as usize;
        assert_eq!(read(0, pb), data[..pb]);
        assert_eq!(read(1000, 70_000), data[1000..71_000]);
        let tail = data.len() as u64 - 10;
        assert_eq!(read(tail, 1000), data[tail as usize..]);
        assert!(file.read(data.len() as u64, 1).is_err());
        // Whole parts come from the mapping with their slot's CRC; other ranges as read.
        for (o, l) in [
            (0, pb),
            (pb as u64, 2 * pb),
            (2 * pb as u64, pb),
            (10, pb),
            (0, 100),
        ] {
            let (bytes, crc) = file.read_shared(o, l).expect("reads");
            let end = (o as usize + l).min(data.len());
            assert_eq!(bytes, data[o as usize..end], "range {o}+{l}");
            assert_eq!(crc, crc32fast::hash(&bytes), "range {o}+{l}");
        }
        let up = store
            .start(6, data.len() as u64, "", "", now_ms())
            .expect("starts");
        put_all(&store, &up, &data);
        assert!(store.finish(&up, &sha).expect("finishes").deduplicated);
        assert_eq!(
            std::fs::read_dir(dir.path().join("files"))
                .expect("lists")
                .count(),
            1
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads"))
                .expect("lists")
                .count(),
            0
        );
    }

    #[test]
    fn parts_written_at_once_are_all_synced_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pb = MEDIA_PART_BYTES as usize;
        let data = content(pb * 16 + 99, 11);
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let id;
        {
            let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("opens");
            let up = store
                .start(5, data.len() as u64, "", "", now_ms())
                .expect("starts");
            id = up.header.upload_id;
            // Eight writers at once, each its own parts: every write returns only once
            // a sync that started after its pwrites finished.
            let shared = Bytes::from(data.clone());
            std::thread::scope(|s| {
                for t in 0..8u32 {
                    let (store, up, data) = (&store, &up, &shared);
                    s.spawn(move || {
                        for i in (t..up.header.part_count()).step_by(8) {
                            let at = i as usize * pb;
                            let part = data.slice(at..(at + pb).min(data.len()));
                            store
                                .write_part_bytes(up, i, crc32fast::hash(&part), &part)
                                .expect("part stored");
                        }
                    });
                }
            });
            // Parts the hasher has not reached are held in memory within the bound;
            // hashing the rest (as finish does) takes every one of them back.
            assert!(store.ahead_bytes.load(Ordering::Relaxed) <= HASH_AHEAD_BYTES_MAX);
            advance_hash(&up, None, true).expect("hashes");
            assert_eq!(lock(&up.hashing).next, up.header.part_count());
            assert_eq!(store.ahead_bytes.load(Ordering::Relaxed), 0);
            let st = lock(&up.sync);
            assert_eq!(st.written, u64::from(up.header.part_count()));
            assert_eq!(st.synced, st.written, "every write is covered by a sync");
        }
        let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("reopens");
        let up = store.upload(5, id).expect("upload survives");
        assert!(up.missing().is_empty(), "every acknowledged part is held");
        store.finish(&up, &sha).expect("the content hashes right");
    }

    #[test]
    fn parts_past_the_hash_ahead_bound_are_read_back_and_the_hash_is_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pb = MEDIA_PART_BYTES as usize;
        let parts = (HASH_AHEAD_BYTES_MAX as usize / pb) + 2;
        let data = Bytes::from(content(pb * parts, 5));
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("opens");
        let up = store
            .start(5, data.len() as u64, "", "", now_ms())
            .expect("starts");
        // Last part first: nothing can be hashed until part 0 arrives, so the kept parts
        // hit the node's bound and the rest must be read back from the file.
        for i in (1..parts).rev() {
            let part = data.slice(i * pb..(i + 1) * pb);
            store
                .write_part_bytes(&up, i as u32, crc32fast::hash(&part), &part)
                .expect("part stored");
            store.hash_ahead(&up);
        }
        assert_eq!(
            store.ahead_bytes.load(Ordering::Relaxed),
            HASH_AHEAD_BYTES_MAX
        );
        assert!(
            lock(&up.state).ahead.len() < parts - 1,
            "some parts were not kept"
        );
        let part = data.slice(..pb);
        store
            .write_part_bytes(&up, 0, crc32fast::hash(&part), &part)
            .expect("part stored");
        store.hash_ahead(&up);
        assert_eq!(store.ahead_bytes.load(Ordering::Relaxed), 0);
        store.finish(&up, &sha).expect("the content hashes right");
    }

    #[test]
    fn a_flipped_byte_in_a_stored_file_is_caught_on_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = content(MEDIA_PART_BYTES as usize + 10, 3);
        let sha: [u8; 32] = Sha256::digest(&data).into();
        {
            let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("opens");
            let up = store
                .start(5, data.len() as u64, "", "", now_ms())
                .expect("starts");
            put_all(&store, &up, &data);
            store.finish(&up, &sha).expect("finishes");
        }
        let path = dir.path().join("files").join(hex(&sha));
        let f = OpenOptions::new().write(true).open(&path).expect("opens");
        f.write_all_at(&[data[20] ^ 1], HEADER_BYTES + 20)
            .expect("flips");
        drop(f);
        let store = MediaStore::open(dir.path(), StoreConfig::default()).expect("opens");
        let file = store.file(&sha).expect("opens").expect("stored");
        assert!(matches!(file.read(0, 100), Err(MediaError::Corrupt { .. })));
        assert!(matches!(
            file.read_shared(0, MEDIA_PART_BYTES as usize),
            Err(MediaError::Corrupt { .. })
        ));
        // The other part is still served.
        let second = MEDIA_PART_BYTES as u64;
        assert_eq!(
            file.read(second, 10).expect("reads").0,
            data[second as usize..]
        );
    }

    #[test]
    fn limits_and_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            upload_ttl: Duration::from_secs(10),
            uploads_per_user_max: 2,
            reserved_bytes_max: 10_000,
        };
        let store = MediaStore::open(dir.path(), config).expect("opens");
        store.start(1, 100, "", "", 1_000).expect("one");
        store.start(1, 100, "", "", 5_000).expect("two");
        assert!(matches!(
            store.start(1, 100, "", "", 5_000),
            Err(MediaError::ResourceExhausted(_))
        ));
        assert!(matches!(
            store.start(2, 9_900, "", "", 5_000),
            Err(MediaError::ResourceExhausted(_))
        ));
        assert_eq!(store.expire(11_000), 1);
        assert_eq!(store.uploads_in_progress(), (1, 100));
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads"))
                .expect("lists")
                .count(),
            1
        );
    }
}
