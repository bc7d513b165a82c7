//! Index files: the run table of a sealed segment, on disk, so that memory holds only one
//! fence key per 4 KiB block (about 0.13 bytes per run). Each lookup reads one checked
//! block.
//!
//! ```text
//! <segment id as 16 hex digits>.idx
//!   header (64 bytes)
//!      0 magic [u8; 8] b"CHLGIDX\0"    8 version u32 (1)     12 block_count u32
//!     16 segment_id u64               24 run_count u64      32 fences_crc u32
//!     36 reserved [u8; 24]            60 header_crc u32 over [0, 60)
//!   fences at 64: block_count × (log_id u64, first_index u64): the first run of each block
//!   blocks from the next multiple of 4096, 4096 bytes each:
//!      0 crc u32 over [4, 4096)       4 count u32
//!      8 count × run (32 bytes): log_id u64, first u64, count u32, offset u32, op u16,
//!        reserved [u8; 6]
//! ```
//! Runs are sorted by (log, first index). Written once, atomically, never modified.

use crate::loghash::LogMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::LogId;
use crate::error::{Error, Result};
use crate::fs::{File, FileSystem, write_file_atomic};
use crate::index::{Run, find_run};

const MAGIC: [u8; 8] = *b"CHLGIDX\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 64;
const BLOCK_BYTES: usize = 4096;
const ITEM_BYTES: usize = 32;
const BLOCK_PREFIX_BYTES: usize = 8;
const ITEMS_PER_BLOCK: usize = (BLOCK_BYTES - BLOCK_PREFIX_BYTES) / ITEM_BYTES;
const FENCE_BYTES: usize = 16;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn blocks_start(block_count: usize) -> usize {
    (HEADER_BYTES + block_count * FENCE_BYTES).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// Encodes a run table as an index file image.
pub(crate) fn encode(segment_id: u64, runs: &LogMap<LogId, Vec<Run>>) -> Vec<u8> {
    // Sorted by (log, first index). A log's runs are almost always in order already
    // (appends continue a log), so sort the logs and only a log whose runs are not: a
    // sealed segment holds hundreds of thousands of runs and sorting them all as one
    // showed in profiles of the maintenance thread.
    let mut logs: Vec<(&LogId, &Vec<Run>)> = runs.iter().collect();
    logs.sort_unstable_by_key(|(log, _)| **log);
    let mut items: Vec<(LogId, Run)> = Vec::with_capacity(runs.values().map(Vec::len).sum());
    for (log, rs) in logs {
        let from = items.len();
        items.extend(rs.iter().map(|r| (*log, *r)));
        let mine = &mut items[from..];
        if !mine.is_sorted_by_key(|(_, r)| r.first) {
            mine.sort_by_key(|(_, r)| r.first);
        }
    }
    let block_count = items.len().div_ceil(ITEMS_PER_BLOCK);
    let start = blocks_start(block_count);
    let mut out = vec![0u8; start + block_count * BLOCK_BYTES];
    for (b, chunk) in items.chunks(ITEMS_PER_BLOCK).enumerate() {
        let fence = HEADER_BYTES + b * FENCE_BYTES;
        out[fence..fence + 8].copy_from_slice(&chunk[0].0.to_le_bytes());
        out[fence + 8..fence + 16].copy_from_slice(&chunk[0].1.first.to_le_bytes());
        let block = &mut out[start + b * BLOCK_BYTES..][..BLOCK_BYTES];
        block[4..8].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        for (k, (log, r)) in chunk.iter().enumerate() {
            let it = &mut block[BLOCK_PREFIX_BYTES + k * ITEM_BYTES..][..ITEM_BYTES];
            it[0..8].copy_from_slice(&log.to_le_bytes());
            it[8..16].copy_from_slice(&r.first.to_le_bytes());
            it[16..20].copy_from_slice(&r.count.to_le_bytes());
            it[20..24].copy_from_slice(&r.offset.to_le_bytes());
            it[24..26].copy_from_slice(&r.op.to_le_bytes());
        }
        let crc = crc32fast::hash(&block[4..]);
        block[0..4].copy_from_slice(&crc.to_le_bytes());
    }
    let fences_crc = crc32fast::hash(&out[HEADER_BYTES..HEADER_BYTES + block_count * FENCE_BYTES]);
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(block_count as u32).to_le_bytes());
    out[16..24].copy_from_slice(&segment_id.to_le_bytes());
    out[24..32].copy_from_slice(&(items.len() as u64).to_le_bytes());
    out[32..36].copy_from_slice(&fences_crc.to_le_bytes());
    let crc = crc32fast::hash(&out[0..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Writes the index file of a segment atomically.
pub(crate) fn write(
    fs: &dyn FileSystem,
    path: &Path,
    segment_id: u64,
    runs: &LogMap<LogId, Vec<Run>>,
) -> Result<()> {
    let image = encode(segment_id, runs);
    write_file_atomic(fs, path, &image).map_err(|e| Error::io("writing index file", path, e))
}

/// An opened index file: its fences in memory, blocks read on demand.
#[derive(Debug)]
pub(crate) struct IdxFile {
    path: PathBuf,
    file: Arc<dyn File>,
    fences: Vec<(LogId, u64)>,
    blocks_start: u64,
}

impl IdxFile {
    pub(crate) fn open(fs: &dyn FileSystem, path: &Path, segment_id: u64) -> Result<IdxFile> {
        let bad = |detail: &str| Error::corruption(path, 0, detail);
        let file = fs
            .open(path, false)
            .map_err(|e| Error::io("opening index file", path, e))?;
        let len = file
            .len()
            .map_err(|e| Error::io("sizing index file", path, e))? as usize;
        if len < HEADER_BYTES {
            return Err(bad("index file shorter than its header"));
        }
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| Error::io("reading index file", path, e))?;
        if header[0..8] != MAGIC || crc32fast::hash(&header[0..60]) != u32_at(&header, 60) {
            return Err(bad("index file header check failed"));
        }
        if u32_at(&header, 8) != VERSION || u64_at(&header, 16) != segment_id {
            return Err(bad("index file version or segment id mismatch"));
        }
        let block_count = u32_at(&header, 12) as usize;
        let start = blocks_start(block_count);
        if len != start + block_count * BLOCK_BYTES {
            return Err(bad("index file length does not match its block count"));
        }
        let mut raw = vec![0u8; block_count * FENCE_BYTES];
        file.read_exact_at(&mut raw, HEADER_BYTES as u64)
            .map_err(|e| Error::io("reading index file", path, e))?;
        if crc32fast::hash(&raw) != u32_at(&header, 32) {
            return Err(Error::corruption(
                path,
                HEADER_BYTES as u64,
                "index fences checksum mismatch",
            ));
        }
        let fences = raw
            .chunks_exact(FENCE_BYTES)
            .map(|f| (u64_at(f, 0), u64_at(f, 8)))
            .collect();
        Ok(IdxFile {
            path: path.to_path_buf(),
            file,
            fences,
            blocks_start: start as u64,
        })
    }

    /// Heap bytes this file keeps in memory.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.fences.capacity() * FENCE_BYTES
    }

    fn block(&self, b: usize) -> Result<Vec<(LogId, Run)>> {
        let offset = self.blocks_start + (b * BLOCK_BYTES) as u64;
        let mut buf = vec![0u8; BLOCK_BYTES];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io("reading index block", &self.path, e))?;
        if crc32fast::hash(&buf[4..]) != u32_at(&buf, 0) {
            return Err(Error::corruption(
                &self.path,
                offset,
                "index block checksum mismatch",
            ));
        }
        let count = u32_at(&buf, 4) as usize;
        if count == 0 || count > ITEMS_PER_BLOCK {
            return Err(Error::corruption(
                &self.path,
                offset,
                "index block item count out of range",
            ));
        }
        Ok((0..count)
            .map(|k| {
                let it = &buf[BLOCK_PREFIX_BYTES + k * ITEM_BYTES..][..ITEM_BYTES];
                let run = Run {
                    first: u64_at(it, 8),
                    count: u32_at(it, 16),
                    offset: u32_at(it, 20),
                    op: u16::from_le_bytes([it[24], it[25]]),
                };
                (u64_at(it, 0), run)
            })
            .collect())
    }

    /// The run of `log` covering `index`, if the file has one.
    pub(crate) fn find(&self, log: LogId, index: u64) -> Result<Option<Run>> {
        let mut b = self.fences.partition_point(|f| *f <= (log, index));
        // Look back across blocks while they may still hold runs of this log (stale
        // overlapping runs can push the covering run into an earlier block).
        while b > 0 {
            b -= 1;
            let items = self.block(b)?;
            let runs: Vec<Run> = items
                .iter()
                .filter(|(l, _)| *l == log)
                .map(|(_, r)| *r)
                .collect();
            if let Some(r) = find_run(&runs, index) {
                return Ok(Some(r));
            }
            if items.first().is_none_or(|(l, _)| *l != log) {
                break;
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFileSystem;

    #[test]
    fn index_file_round_trips_many_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut runs: LogMap<LogId, Vec<Run>> = LogMap::default();
        for log in 0..50u64 {
            let v = runs.entry(log).or_default();
            for k in 0..20u64 {
                v.push(Run {
                    first: 1 + k * 3,
                    count: 3,
                    offset: (log * 100 + k) as u32,
                    op: 7,
                });
            }
        }
        let path = dir.path().join("a.idx");
        write(&StdFileSystem, &path, 9, &runs).expect("writes");
        let f = IdxFile::open(&StdFileSystem, &path, 9).expect("opens");
        assert!(f.fences.len() > 5);
        for log in 0..50u64 {
            for index in 1..61u64 {
                let r = f.find(log, index).expect("reads").expect("found");
                assert!(r.first <= index && index < r.first + 3);
                assert_eq!(r.offset as u64, log * 100 + (index - 1) / 3);
            }
            assert_eq!(f.find(log, 61).expect("reads"), None);
        }
        assert_eq!(f.find(99, 1).expect("reads"), None);
        assert!(
            IdxFile::open(&StdFileSystem, &path, 8).is_err(),
            "wrong segment accepted"
        );
    }

    #[test]
    fn runs_out_of_order_are_sorted_like_one_global_sort() {
        // `encode` sorts per log; the image must equal that of sorting every run by
        // (log, first index) at once, in-order logs and shuffled ones alike.
        let mut runs: LogMap<LogId, Vec<Run>> = LogMap::default();
        for log in (0..300u64).rev() {
            let v = runs.entry(log * 7919 % 1000).or_default();
            for k in 0..5u64 {
                // Every third log's runs are reversed.
                let k = if log % 3 == 0 { 4 - k } else { k };
                v.push(Run {
                    first: 1 + k * 2,
                    count: 2,
                    offset: (log + k) as u32,
                    op: k as u16,
                });
            }
        }
        let image = encode(5, &runs);
        let mut all: Vec<(LogId, Run)> = runs
            .iter()
            .flat_map(|(log, rs)| rs.iter().map(move |r| (*log, *r)))
            .collect();
        all.sort_by_key(|(log, r)| (*log, r.first));
        let mut sorted: LogMap<LogId, Vec<Run>> = LogMap::default();
        for (log, r) in all {
            sorted.entry(log).or_default().push(r);
        }
        assert_eq!(image, encode(5, &sorted));
        let first_block = &image[blocks_start(u32_at(&image, 12) as usize)..][..BLOCK_BYTES];
        let mut prev = (0u64, 0u64);
        for k in 0..u32_at(first_block, 4) as usize {
            let it = &first_block[BLOCK_PREFIX_BYTES + k * ITEM_BYTES..];
            let key = (u64_at(it, 0), u64_at(it, 8));
            assert!(key > prev || k == 0, "items out of order at {k}");
            prev = key;
        }
    }

    #[test]
    fn flipped_block_is_reported_as_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut runs: LogMap<LogId, Vec<Run>> = LogMap::default();
        runs.insert(
            1,
            vec![Run {
                first: 1,
                count: 1,
                offset: 4096,
                op: 0,
            }],
        );
        let path = dir.path().join("b.idx");
        write(&StdFileSystem, &path, 1, &runs).expect("writes");
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() - BLOCK_BYTES + 20;
        bytes[at] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let f = IdxFile::open(&StdFileSystem, &path, 1).expect("header still fine");
        let err = f.find(1, 1).expect_err("flip must be caught");
        assert!(err.is_corruption(), "{err}");
    }
}
