//! The check behind the `segment_open` fuzz target, shared with the corpus test
//! (`storage/tests/fuzz_corpus.rs` includes this file with `#[path]`).
//!
//! An input becomes a data directory holding segment `0000000000000001.seg` (and, in one
//! mode, a checkpoint and an index file); the engine opens it. Properties:
//! - `no_panic`: opening, reading and reopening never panic (the caller watches every
//!   thread: libFuzzer aborts on any panic, the corpus test installs a hook).
//! - `entries_are_backed`: every entry the engine returns equals an entry of a record in
//!   the input whose header and body checksums match, checked here independently of the
//!   engine's reader, for every index of every log.
//! - `recovery_is_stable`: if the directory opened once, it opens again, and every entry
//!   read the first time reads the same the second time.
//!
//! Input layout (byte 0 picks the mode; its bit 7 asks for strict recovery):
//! ```text
//! mode 0  raw:     the rest is the segment file
//! mode 1  files:   u32 len, segment; u32 len, checkpoint; the rest is 0000000000000001.idx
//! mode 2  header:  a valid segment header (salt FIXED_SALT), then the rest from offset 4096
//! mode 3  records: a valid segment header, then records built from the rest, each:
//!                  ctl u8, len u16, len bytes; the header checksum is always made right
//!                  ctl bit 0-1: kind (0,1 batch, 2 seal, 3 the next byte of input)
//!                  ctl bit 2:   body made from op descriptions (below) instead of raw bytes
//!                  ctl bit 4:   write_offset of the first record (a group write) not its own
//!                  ctl bit 5:   LZ4-compress the body
//!                  ctl bit 6:   skip a record sequence number
//!                  ctl bit 7:   leave the body checksum wrong
//!         op description: kind u8, log u8, index u8 (flag 0x80: u64 follows), count u8,
//!                         payload bytes u8; payloads are taken from the input
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bytes::Bytes;
use chatlog_storage::format::{
    BatchBody, OpHeader, OpKind, RECORD_FLAG_LZ4, RECORD_HEADER_BYTES, RECORD_KIND_BATCH,
    RECORD_KIND_SEAL, RECORD_MAGIC, RecordHeader, SEGMENT_HEADER_BYTES, SegmentHeader, align_up,
    decode_body,
};
use chatlog_storage::{Config, Engine, Error, IoMode, RecoveryMode};

/// Salt of the segment header the structured modes write.
pub const FIXED_SALT: u32 = 0x5eed_c0de;
/// Most indexes read per log: a crafted checkpoint can claim any bounds.
const READS_PER_LOG_MAX: u64 = 20_000;
/// Largest segment an input may make: inputs are small, this bounds the structured modes.
const SEGMENT_FILE_BYTES_MAX: usize = 8 << 20;
const SEGMENT_NAME: &str = "0000000000000001.seg";

/// What one input did, for the corpus test's summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The engine opened the directory.
    pub opened: bool,
    /// Entries read successfully (each checked against the records).
    pub entries: u64,
    /// Reads that returned an error (corruption found, missing files).
    pub read_errors: u64,
}

struct Files {
    segment: Vec<u8>,
    checkpoint: Option<Vec<u8>>,
    idx: Option<Vec<u8>>,
    strict: bool,
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fn take_u8(data: &mut &[u8]) -> Option<u8> {
    take(data, 1).map(|b| b[0])
}

fn take_u16(data: &mut &[u8]) -> Option<u16> {
    take(data, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn take_u32(data: &mut &[u8]) -> Option<u32> {
    take(data, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4")))
}

fn fixed_header() -> Vec<u8> {
    let mut seg = vec![0u8; SEGMENT_HEADER_BYTES];
    seg[..32].copy_from_slice(
        &SegmentHeader {
            segment_id: 1,
            salt: FIXED_SALT,
        }
        .encode(),
    );
    seg
}

/// Builds a batch body from op descriptions; payload bytes come from the input.
fn ops_body(data: &mut &[u8]) -> Vec<u8> {
    struct Op {
        kind: u8,
        log: u64,
        index: u64,
        entries: Vec<Vec<u8>>,
        meta: Vec<u8>,
    }
    let mut ops = Vec::new();
    while ops.len() < 16 {
        let (Some(kind), Some(log), Some(index), Some(count), Some(len)) = (
            take_u8(data),
            take_u8(data),
            take_u8(data),
            take_u8(data),
            take_u8(data),
        ) else {
            break;
        };
        let index = if index & 0x80 != 0 {
            take(data, 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8")))
        } else {
            index as u64
        };
        let kind = 1 + kind % 7;
        let mut entries = Vec::new();
        let mut meta = Vec::new();
        if OpKind::from_u8(kind).is_some_and(|k| k.carries_entries()) {
            let count = if kind == OpKind::Redact as u8 {
                1
            } else {
                1 + count % 8
            };
            for _ in 0..count {
                let n = (len as usize).min(data.len());
                entries.push(take(data, n).unwrap_or_default().to_vec());
            }
        } else if kind == OpKind::PutMeta as u8 || kind == OpKind::DeleteMeta as u8 {
            let n = (len as usize).min(data.len());
            meta = take(data, n).unwrap_or_default().to_vec();
        }
        ops.push(Op {
            kind,
            log: (log % 4) as u64,
            index,
            entries,
            meta,
        });
    }
    let head = 8 + ops.len() * 40;
    let mut body = vec![0u8; head];
    body[0..4].copy_from_slice(&(ops.len() as u32).to_le_bytes());
    for (i, op) in ops.iter().enumerate() {
        let start = body.len();
        let count = if op.entries.is_empty() {
            // Meta ops: key length in `count`; take half the bytes as the key.
            body.extend_from_slice(&op.meta);
            (op.meta.len() / 2) as u32
        } else {
            let mut end = 0u32;
            for e in &op.entries {
                end += e.len() as u32;
                body.extend_from_slice(&end.to_le_bytes());
            }
            for e in &op.entries {
                body.extend_from_slice(e);
            }
            op.entries.len() as u32
        };
        let header = OpHeader {
            kind: OpKind::from_u8(op.kind).expect("1..=7"),
            count,
            log_id: op.log,
            index: op.index,
            aux: if op.kind == OpKind::Rewrite as u8 {
                op.index % 3
            } else {
                0
            },
            data_offset: start as u32,
            data_len: (body.len() - start) as u32,
        };
        header.encode_into(&mut body[8 + i * 40..]);
    }
    body
}

/// Builds a segment of records from their descriptions (mode 3).
fn records_segment(mut data: &[u8]) -> Vec<u8> {
    let mut seg = fixed_header();
    let mut seq = 1u64;
    let mut first_offset = None;
    while let (Some(ctl), Some(len)) = (take_u8(&mut data), take_u16(&mut data)) {
        let kind = match ctl & 3 {
            0 | 1 => RECORD_KIND_BATCH,
            2 => RECORD_KIND_SEAL,
            _ => take_u8(&mut data).unwrap_or(0),
        };
        let raw = if ctl & 4 != 0 {
            ops_body(&mut data)
        } else {
            let n = (len as usize).min(data.len());
            take(&mut data, n).unwrap_or_default().to_vec()
        };
        let (body, flags) = if ctl & 0x20 != 0 {
            (lz4_flex_free_compress(&raw), RECORD_FLAG_LZ4)
        } else {
            (raw.clone(), 0)
        };
        if ctl & 0x40 != 0 {
            seq += 1;
        }
        let offset = seg.len();
        let first = *first_offset.get_or_insert(offset);
        let write_offset = if ctl & 0x10 != 0 { first } else { offset };
        let mut body_crc = crc32fast::hash(&body);
        if ctl & 0x80 != 0 {
            body_crc ^= 1;
        }
        let header = RecordHeader {
            kind,
            flags,
            body_len: body.len() as u32,
            raw_len: raw.len() as u32,
            body_crc,
            record_seq: seq,
            write_offset: write_offset as u32,
        };
        seq += 1;
        let mut h = [0u8; RECORD_HEADER_BYTES];
        header.encode_into(FIXED_SALT, &mut h);
        seg.extend_from_slice(&h);
        seg.extend_from_slice(&body);
        seg.resize(offset + align_up(RECORD_HEADER_BYTES + body.len()), 0);
        if seg.len() > SEGMENT_FILE_BYTES_MAX {
            break;
        }
    }
    seg
}

/// The structured mode cannot depend on lz4_flex (the storage crate keeps it private), so
/// it writes LZ4 "compressed" bodies as one literal run: a valid LZ4 block that
/// decompresses to `raw`.
fn lz4_flex_free_compress(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 255 + 2);
    let n = raw.len();
    if n >= 15 {
        out.push(0xf0);
        let mut rest = n - 15;
        while rest >= 255 {
            out.push(255);
            rest -= 255;
        }
        out.push(rest as u8);
    } else {
        out.push((n as u8) << 4);
    }
    out.extend_from_slice(raw);
    out
}

fn files(data: &[u8]) -> Option<Files> {
    let mut data = data;
    let mode = take_u8(&mut data)?;
    let strict = mode & 0x80 != 0;
    let files = match mode & 0x7f {
        0 => Files {
            segment: data.to_vec(),
            checkpoint: None,
            idx: None,
            strict,
        },
        1 => {
            let n = take_u32(&mut data)? as usize;
            let segment = take(&mut data, n)?.to_vec();
            let n = take_u32(&mut data)? as usize;
            let checkpoint = Some(take(&mut data, n)?.to_vec());
            let idx = (!data.is_empty()).then(|| data.to_vec());
            Files {
                segment,
                checkpoint,
                idx,
                strict,
            }
        }
        2 => {
            let mut segment = fixed_header();
            segment.extend_from_slice(data);
            Files {
                segment,
                checkpoint: None,
                idx: None,
                strict,
            }
        }
        3 => Files {
            segment: records_segment(data),
            checkpoint: None,
            idx: None,
            strict,
        },
        _ => return None,
    };
    (files.segment.len() <= SEGMENT_FILE_BYTES_MAX).then_some(files)
}

/// Every entry held by a record of `segment` whose checksums match, found by trying every
/// aligned offset (a superset of what a correct reader can return).
fn backed_entries(segment: &[u8]) -> BTreeMap<(u64, u64), BTreeSet<Vec<u8>>> {
    let mut out: BTreeMap<(u64, u64), BTreeSet<Vec<u8>>> = BTreeMap::new();
    let Ok(header) = SegmentHeader::decode(segment) else {
        return out;
    };
    let salt = header.salt;
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let mut at = SEGMENT_HEADER_BYTES;
    while at + RECORD_HEADER_BYTES <= segment.len() {
        let h = &segment[at..at + RECORD_HEADER_BYTES];
        let mut crc = crc32fast::Hasher::new_with_initial(salt);
        crc.update(&h[8..40]);
        if u32_at(h, 0) == RECORD_MAGIC && crc.finalize() == u32_at(h, 4) {
            let header = RecordHeader::decode(salt, h).expect("checked above");
            let start = at + RECORD_HEADER_BYTES;
            let end = start.saturating_add(header.body_len as usize);
            if header.kind == RECORD_KIND_BATCH
                && end <= segment.len()
                && crc32fast::hash(&segment[start..end]) == header.body_crc
                && let Ok(raw) = decode_body(&header, Bytes::copy_from_slice(&segment[start..end]))
                && let Ok(body) = BatchBody::parse(raw)
            {
                for i in 0..body.op_count() {
                    let op = body.op(i);
                    if !op.kind.carries_entries() {
                        continue;
                    }
                    for k in 0..op.count as usize {
                        let index = op.index + k as u64;
                        out.entry((op.log_id, index))
                            .or_default()
                            .insert(body.entry(&op, k).to_vec());
                    }
                }
            }
        }
        at += 8;
    }
    out
}

/// Reads every index of every log; panics if an entry is not backed. Returns what was read.
fn read_all(
    engine: &Engine,
    backed: &BTreeMap<(u64, u64), BTreeSet<Vec<u8>>>,
    out: &mut Outcome,
) -> BTreeMap<(u64, u64), Vec<u8>> {
    let mut read = BTreeMap::new();
    for log in engine.logs() {
        let Some(bounds) = engine.bounds(log) else {
            panic!("entries_are_backed: log {log} is listed but has no bounds");
        };
        let end = bounds
            .next
            .min(bounds.first.saturating_add(READS_PER_LOG_MAX));
        for index in bounds.first..end {
            match engine.get(log, index) {
                Ok(p) => {
                    let ok = backed
                        .get(&(log, index))
                        .is_some_and(|set| set.contains(&p[..]));
                    assert!(
                        ok,
                        "entries_are_backed: log {log} entry {index} ({} bytes) is in no record \
                         whose checksums match",
                        p.len()
                    );
                    out.entries += 1;
                    read.insert((log, index), p.to_vec());
                }
                Err(Error::LogFailed { .. }) => {
                    out.read_errors += 1;
                    break;
                }
                Err(_) => out.read_errors += 1,
            }
        }
        // Reading past the bounds is refused, never answered.
        if bounds.next < u64::MAX {
            assert!(
                engine.get(log, bounds.next).is_err(),
                "a read past the end of log {log} returned data"
            );
        }
    }
    read
}

fn config(dir: &Path, strict: bool) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = 256 << 10;
    c.io_mode = IoMode::Syscall;
    c.compaction_interval_ms = 3_600_000;
    c.recovery_mode = if strict {
        RecoveryMode::Strict
    } else {
        RecoveryMode::TolerateTornTail
    };
    c
}

/// Runs one input in a fresh directory under `scratch`. Panics on a broken property.
pub fn check_in(scratch: &Path, data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    let Some(files) = files(data) else { return out };
    let dir = tempfile::tempdir_in(scratch).expect("scratch directory");
    std::fs::write(dir.path().join(SEGMENT_NAME), &files.segment).expect("write segment");
    if let Some(cp) = &files.checkpoint {
        std::fs::write(dir.path().join("checkpoint"), cp).expect("write checkpoint");
    }
    if let Some(idx) = &files.idx {
        std::fs::write(dir.path().join("0000000000000001.idx"), idx).expect("write index");
    }
    let backed = backed_entries(&files.segment);
    let cfg = config(dir.path(), files.strict);
    let Ok(engine) = Engine::open(cfg.clone()) else {
        return out;
    };
    out.opened = true;
    let first = read_all(&engine, &backed, &mut out);
    let _ = engine.close();
    let engine = match Engine::open(cfg) {
        Ok(e) => e,
        Err(e) => panic!("recovery_is_stable: opened once, then failed to reopen: {e}"),
    };
    let mut again = Outcome::default();
    let second = read_all(&engine, &backed, &mut again);
    for (key, payload) in &first {
        if let Some(p) = second.get(key) {
            assert_eq!(
                p, payload,
                "recovery_is_stable: entry {key:?} changed across a reopen"
            );
        } else {
            panic!("recovery_is_stable: entry {key:?} read before a reopen is gone after it");
        }
    }
    let _ = engine.close();
    out
}

/// Runs one input in the system's scratch space (tmpfs when there is one: the check is
/// about bytes, not durability, and fdatasync on tmpfs costs nothing).
pub fn check(data: &[u8]) -> Outcome {
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    check_in(&scratch, data)
}
