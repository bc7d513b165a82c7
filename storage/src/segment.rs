//! Segment files: creating (fresh or recycled), naming, and reading checked records.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use memmap2::Mmap;

use crate::config::Preallocation;
use crate::error::{Error, Result};
use crate::format::{
    BatchBody, RECORD_HEADER_BYTES, RECORD_KIND_BATCH, RecordHeader, SEGMENT_HEADER_BYTES,
    SegmentHeader, decode_body,
};
use crate::fs::{File, FileSystem};
use crate::idx::IdxFile;

/// Record bodies up to this size are copied out of the mapping for a read (then checked
/// and cacheable); larger ones are checked in place on every read.
pub(crate) const COPY_BYTES_MAX: usize = 256 << 10;

/// Zero-fill chunk for fresh segments: large enough for sequential speed, small enough
/// not to matter as memory.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

pub(crate) fn idx_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.idx"))
}

pub(crate) fn recycle_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("recycle-{id:016x}"))
}

/// Parses `<16 hex>.<ext>`.
pub(crate) fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

/// An open segment. Shared by `Arc` with readers; payloads handed out as `Bytes` keep it
/// (and its mapping) alive.
#[derive(Debug)]
pub(crate) struct Segment {
    pub id: u64,
    pub path: PathBuf,
    pub file: Arc<dyn File>,
    pub map: Option<Mmap>,
    pub salt: u32,
    pub len: u64,
    idx: OnceLock<Arc<IdxFile>>,
}

fn new_salt(id: u64) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(id);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

impl Segment {
    /// Creates segment `id`: reuses a recycled file when one is given (its old records
    /// fail the header check under the new salt), otherwise sizes a new file as
    /// `prealloc` says (zero-filled, fallocated or sparse: the unused part reads as zeros
    /// either way, so recovery finds no record there).
    pub(crate) fn create(
        fs: &dyn FileSystem,
        dir: &Path,
        id: u64,
        bytes: u64,
        recycled: Option<PathBuf>,
        prealloc: Preallocation,
    ) -> Result<Segment> {
        Segment::create_salted(fs, dir, id, bytes, recycled, prealloc, new_salt(id))
    }

    /// [`Segment::create`] with a given salt: the inline engine mode derives it from its
    /// seed (`storage/src/inline.rs`), so a simulation replays byte for byte.
    pub(crate) fn create_salted(
        fs: &dyn FileSystem,
        dir: &Path,
        id: u64,
        bytes: u64,
        recycled: Option<PathBuf>,
        prealloc: Preallocation,
        salt: u32,
    ) -> Result<Segment> {
        let path = segment_path(dir, id);
        let mut head = vec![0u8; SEGMENT_HEADER_BYTES];
        head[..32].copy_from_slice(
            &SegmentHeader {
                segment_id: id,
                salt,
            }
            .encode(),
        );
        let file = match recycled {
            Some(old) => {
                // The new header goes in before the rename: a crash in between leaves
                // either a recycle file (any content is fine there) or a segment whose
                // header matches its name. Old records fail under the new salt.
                let file = fs
                    .open(&old, false)
                    .map_err(|e| Error::io("opening", &old, e))?;
                let len = file.len().map_err(|e| Error::io("sizing", &old, e))?;
                if len != bytes {
                    file.set_len(bytes)
                        .map_err(|e| Error::io("resizing", &old, e))?;
                }
                file.write_all_at(&head, 0)
                    .map_err(|e| Error::io("writing segment header", &old, e))?;
                file.sync_data()
                    .map_err(|e| Error::io("syncing segment", &old, e))?;
                fs.rename(&old, &path)
                    .map_err(|e| Error::io("recycling segment", &old, e))?;
                file
            }
            None => {
                // Sized first, header last: a crash midway leaves a file without a valid
                // header, which recovery removes.
                let file = fs
                    .open(&path, true)
                    .map_err(|e| Error::io("creating", &path, e))?;
                match prealloc {
                    Preallocation::ZeroFill => {
                        let zeros = vec![0u8; ZERO_FILL_CHUNK_BYTES];
                        let mut at = 0u64;
                        while at < bytes {
                            let n = (bytes - at).min(zeros.len() as u64) as usize;
                            file.write_all_at(&zeros[..n], at)
                                .map_err(|e| Error::io("zero-filling segment", &path, e))?;
                            at += n as u64;
                        }
                    }
                    Preallocation::Fallocate => file
                        .allocate(bytes)
                        .map_err(|e| Error::io("allocating segment", &path, e))?,
                    Preallocation::Sparse => file
                        .set_len(bytes)
                        .map_err(|e| Error::io("sizing segment", &path, e))?,
                }
                file.write_all_at(&head, 0)
                    .map_err(|e| Error::io("writing segment header", &path, e))?;
                file.sync_data()
                    .map_err(|e| Error::io("syncing new segment", &path, e))?;
                file
            }
        };
        fs.sync_dir(dir)
            .map_err(|e| Error::io("syncing directory", dir, e))?;
        let map = file
            .map()
            .map_err(|e| Error::io("mapping segment", &path, e))?;
        Ok(Segment {
            id,
            path,
            file,
            map,
            salt,
            len: bytes,
            idx: OnceLock::new(),
        })
    }

    /// Opens an existing segment and checks its header. `Ok(None)`: the header is not
    /// valid (an interrupted creation); the caller decides whether that is acceptable.
    pub(crate) fn open(fs: &dyn FileSystem, dir: &Path, id: u64) -> Result<Option<Segment>> {
        let path = segment_path(dir, id);
        let file = fs
            .open(&path, false)
            .map_err(|e| Error::io("opening segment", &path, e))?;
        let len = file
            .len()
            .map_err(|e| Error::io("sizing segment", &path, e))?;
        let mut head = [0u8; 32];
        if len < SEGMENT_HEADER_BYTES as u64 {
            return Ok(None);
        }
        file.read_exact_at(&mut head, 0)
            .map_err(|e| Error::io("reading segment", &path, e))?;
        let header = match SegmentHeader::decode(&head) {
            Ok(h) => h,
            Err(_) => return Ok(None),
        };
        if header.segment_id != id {
            return Err(Error::corruption(
                &path,
                16,
                "segment id in header does not match its name",
            ));
        }
        let map = file
            .map()
            .map_err(|e| Error::io("mapping segment", &path, e))?;
        Ok(Some(Segment {
            id,
            path,
            file,
            map,
            salt: header.salt,
            len,
            idx: OnceLock::new(),
        }))
    }

    /// `len` bytes at `offset`. Up to [`COPY_BYTES_MAX`] they are copied out of the
    /// mapping before they are checked, so what was checked is exactly what gets used
    /// (and can be cached). Larger spans are zero-copy slices of the mapping, checked on
    /// every read and never cached: copying a 1 MiB record per entry read made pages of
    /// large entries 7x slower. Without a mapping they are read. Bounds are checked by
    /// the caller against `self.len`.
    fn bytes_at(self: &Arc<Segment>, offset: u64, len: usize) -> Result<Bytes> {
        if let Some(map) = &self.map {
            let start = offset as usize;
            if len > COPY_BYTES_MAX {
                return Ok(Bytes::from_owner(MapSlice {
                    segment: self.clone(),
                    start,
                    end: start + len,
                }));
            }
            return Ok(Bytes::copy_from_slice(&map[start..start + len]));
        }
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io("reading segment", &self.path, e))?;
        Ok(Bytes::from(buf))
    }

    /// Reads and checks the record header at `offset`; `None` if no valid record starts
    /// there.
    pub(crate) fn header_at(self: &Arc<Segment>, offset: u64) -> Result<Option<RecordHeader>> {
        if offset + RECORD_HEADER_BYTES as u64 > self.len {
            return Ok(None);
        }
        let raw = self.bytes_at(offset, RECORD_HEADER_BYTES)?;
        Ok(RecordHeader::decode(self.salt, &raw))
    }

    /// Reads the record body at `offset` whose header is `header`, checked.
    pub(crate) fn body_at(
        self: &Arc<Segment>,
        offset: u64,
        header: &RecordHeader,
    ) -> Result<Bytes> {
        let start = offset + RECORD_HEADER_BYTES as u64;
        if start + header.body_len as u64 > self.len {
            return Err(Error::corruption(
                &self.path,
                offset,
                "record runs past the segment end",
            ));
        }
        let on_disk = self.bytes_at(start, header.body_len as usize)?;
        decode_body(header, on_disk).map_err(|d| Error::corruption(&self.path, offset, d))
    }

    /// Reads the batch record at `offset` (header, body CRC, decompression, structure),
    /// also saying whether the body is a private copy (copied, decompressed or read)
    /// rather than a slice of the mapping; only private copies may be cached, since a
    /// mapping's page is checked only when read.
    pub(crate) fn batch_at(self: &Arc<Segment>, offset: u64) -> Result<(BatchBody, bool)> {
        let header = self
            .header_at(offset)?
            .ok_or_else(|| Error::corruption(&self.path, offset, "record header check failed"))?;
        if header.kind != RECORD_KIND_BATCH {
            return Err(Error::corruption(
                &self.path,
                offset,
                "index points at a non-batch record",
            ));
        }
        let raw = self.body_at(offset, &header)?;
        let private = self.map.is_none()
            || header.body_len as usize <= COPY_BYTES_MAX
            || header.flags & crate::format::RECORD_FLAG_LZ4 != 0;
        let body = BatchBody::parse(raw).map_err(|d| Error::corruption(&self.path, offset, d))?;
        Ok((body, private))
    }

    /// The segment's index file, opened on first use.
    pub(crate) fn idx(&self, fs: &dyn FileSystem, dir: &Path) -> Result<Arc<IdxFile>> {
        if let Some(i) = self.idx.get() {
            return Ok(i.clone());
        }
        let i = Arc::new(IdxFile::open(fs, &idx_path(dir, self.id), self.id)?);
        Ok(self.idx.get_or_init(|| i).clone())
    }

    /// Installs an index file just written.
    pub(crate) fn set_idx(&self, idx: Arc<IdxFile>) {
        let _ = self.idx.set(idx);
    }

    /// Heap bytes held by this segment's loaded index file.
    pub(crate) fn idx_memory_bytes(&self) -> usize {
        self.idx.get().map_or(0, |i| i.memory_bytes())
    }
}

/// A slice of a segment mapping that keeps the segment (and its mapping) alive.
struct MapSlice {
    segment: Arc<Segment>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        let map = self
            .segment
            .map
            .as_ref()
            .expect("MapSlice is only made for mapped segments");
        &map[self.start..self.end]
    }
}
