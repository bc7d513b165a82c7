//! Bytes on disk: segment headers, record headers and record bodies. `storage/FORMAT.md`
//! describes the same layout for people; keep the two in step.
//!
//! All integers are little-endian and fixed-width. Nothing here touches files: these are
//! pure functions from bytes to values and back, so they can be fuzzed directly.
//!
//! ```text
//! Segment file  <id as 16 hex digits>.seg, preallocated to `segment_bytes`
//!   [0, 4096)   segment header (below), zero-padded
//!   [4096, …)   records, each starting at an 8-byte aligned offset, then zeros (or the
//!               stale bytes of a recycled file, which fail the header check: other salt)
//!
//! Segment header (32 bytes used)
//!    0  magic        [u8; 8]  b"CHLGSEG\0"
//!    8  version      u32      1
//!   12  flags        u32      0
//!   16  segment_id   u64      must match the file name
//!   24  salt         u32      seed of every record header CRC in this segment
//!   28  header_crc   u32      crc32 of bytes [0, 28)
//!
//! Record header (40 bytes)
//!    0  magic        u32      0x524c4843 ("CHLR")
//!    4  header_crc   u32      crc32 seeded with the segment salt over bytes [8, 40)
//!    8  kind         u8       1 = batch, 2 = seal
//!    9  flags        u8       bit 0: body is LZ4 (lz4_flex block format)
//!   10  reserved     u16      0
//!   12  body_len     u32      body bytes on disk
//!   16  raw_len      u32      body bytes after decompression (= body_len if uncompressed)
//!   20  body_crc     u32      crc32 of the body bytes on disk
//!   24  record_seq   u64      engine-wide, +1 per record, never reused
//!   32  write_offset u32      offset where the write carrying this record began
//!   36  reserved     u32      0
//!   40  body, then zero padding to the next multiple of 8
//!
//! Batch body (raw)
//!    0  op_count     u32
//!    4  reserved     u32      0
//!    8  op_count × op header (40 bytes):
//!          0 kind u8 (1 append, 2 truncate_after, 3 purge_before, 4 redact, 5 put_meta,
//!                     6 delete_meta, 7 rewrite)
//!          1 reserved [u8; 3]
//!          4 count u32        entries (append, rewrite, redact = 1) or key length (meta)
//!          8 log_id u64
//!         16 index u64        first index (append, rewrite), the index (others)
//!         24 aux u64          rewrite: source segment id; otherwise 0
//!         32 data_offset u32  from the body start
//!         36 data_len u32
//!    data of each op:
//!       entries (append, rewrite, redact): count × u32 cumulative end offsets, then the
//!                                          payloads back to back
//!       put_meta: key bytes (count of them), then the value
//!       delete_meta: key bytes
//!
//! Seal body: next_segment_id u64.
//! ```
//!
//! Assumptions made of the disk: a write that was followed by a successful fdatasync is
//! durable; a write that was not may be lost in part, in any order of its pages (a torn
//! write); a bit may rot in any page. The header checks catch stale and torn records, the
//! body CRC catches rot, and `write_offset` tells a torn tail from damage inside synced data.

use bytes::Bytes;

/// Bytes reserved for the segment header; records start here.
pub const SEGMENT_HEADER_BYTES: usize = 4096;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 40;
/// Bytes of one operation header in a batch body.
pub const OP_HEADER_BYTES: usize = 40;
/// Bytes before the op headers in a batch body.
pub const BODY_PREFIX_BYTES: usize = 8;
/// Records start on multiples of this.
pub const RECORD_ALIGN: usize = 8;

pub const SEGMENT_MAGIC: [u8; 8] = *b"CHLGSEG\0";
pub const SEGMENT_VERSION: u32 = 1;
pub const RECORD_MAGIC: u32 = 0x524c_4843;

pub const RECORD_KIND_BATCH: u8 = 1;
pub const RECORD_KIND_SEAL: u8 = 2;
pub const RECORD_FLAG_LZ4: u8 = 1;

const _: () = assert!(SEGMENT_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));

/// Rounds `n` up to the record alignment.
pub fn align_up(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn crc_seeded(seed: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(bytes);
    h.finalize()
}

/// The header at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment_id: u64,
    pub salt: u32,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a segment header; the error says which check failed.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, &'static str> {
        if b.len() < 32 {
            return Err("segment shorter than its header");
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic");
        }
        if crc32fast::hash(&b[0..28]) != u32_at(b, 28) {
            return Err("segment header checksum mismatch");
        }
        let version = u32_at(b, 8);
        if version != SEGMENT_VERSION {
            return Err("unsupported segment format version");
        }
        Ok(SegmentHeader {
            segment_id: u64_at(b, 16),
            salt: u32_at(b, 24),
        })
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u8,
    pub flags: u8,
    pub body_len: u32,
    pub raw_len: u32,
    pub body_crc: u32,
    pub record_seq: u64,
    pub write_offset: u32,
}

impl RecordHeader {
    /// Bytes the whole record occupies, padding included.
    pub fn record_bytes(&self) -> usize {
        align_up(RECORD_HEADER_BYTES + self.body_len as usize)
    }

    pub fn encode_into(&self, salt: u32, out: &mut [u8]) {
        let b = &mut out[..RECORD_HEADER_BYTES];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[8] = self.kind;
        b[9] = self.flags;
        b[10..12].fill(0);
        b[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.body_crc.to_le_bytes());
        b[24..32].copy_from_slice(&self.record_seq.to_le_bytes());
        b[32..36].copy_from_slice(&self.write_offset.to_le_bytes());
        b[36..40].fill(0);
        let crc = crc_seeded(salt, &b[8..40]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a record header and checks its magic and salted checksum. `None` means
    /// "no record of this segment starts here": zeros, stale bytes, or a torn header.
    pub fn decode(salt: u32, b: &[u8]) -> Option<RecordHeader> {
        if b.len() < RECORD_HEADER_BYTES || u32_at(b, 0) != RECORD_MAGIC {
            return None;
        }
        if crc_seeded(salt, &b[8..40]) != u32_at(b, 4) {
            return None;
        }
        Some(RecordHeader {
            kind: b[8],
            flags: b[9],
            body_len: u32_at(b, 12),
            raw_len: u32_at(b, 16),
            body_crc: u32_at(b, 20),
            record_seq: u64_at(b, 24),
            write_offset: u32_at(b, 32),
        })
    }
}

/// The operation kinds of a batch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    Append = 1,
    TruncateAfter = 2,
    PurgeBefore = 3,
    Redact = 4,
    PutMeta = 5,
    DeleteMeta = 6,
    Rewrite = 7,
}

impl OpKind {
    pub fn from_u8(v: u8) -> Option<OpKind> {
        Some(match v {
            1 => OpKind::Append,
            2 => OpKind::TruncateAfter,
            3 => OpKind::PurgeBefore,
            4 => OpKind::Redact,
            5 => OpKind::PutMeta,
            6 => OpKind::DeleteMeta,
            7 => OpKind::Rewrite,
            _ => return None,
        })
    }

    /// Whether the op's data is a list of entries (and so is indexed).
    pub fn carries_entries(self) -> bool {
        matches!(self, OpKind::Append | OpKind::Redact | OpKind::Rewrite)
    }
}

/// One operation header of a batch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    pub kind: OpKind,
    pub count: u32,
    pub log_id: u64,
    pub index: u64,
    pub aux: u64,
    pub data_offset: u32,
    pub data_len: u32,
}

impl OpHeader {
    pub fn encode_into(&self, out: &mut [u8]) {
        let b = &mut out[..OP_HEADER_BYTES];
        b[0] = self.kind as u8;
        b[1..4].fill(0);
        b[4..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..16].copy_from_slice(&self.log_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..32].copy_from_slice(&self.aux.to_le_bytes());
        b[32..36].copy_from_slice(&self.data_offset.to_le_bytes());
        b[36..40].copy_from_slice(&self.data_len.to_le_bytes());
    }
}

/// A checked view of a raw (decompressed) batch body. Construction validates every op
/// header and every entry offset table, so accessors cannot go out of bounds.
#[derive(Debug, Clone)]
pub struct BatchBody {
    raw: Bytes,
    op_count: usize,
}

impl BatchBody {
    /// Checks the structure of a raw body: op headers inside the body, data inside the
    /// body, entry end offsets non-decreasing and inside the op's data.
    pub fn parse(raw: Bytes) -> Result<BatchBody, &'static str> {
        if raw.len() < BODY_PREFIX_BYTES {
            return Err("batch body shorter than its prefix");
        }
        let op_count = u32_at(&raw, 0) as usize;
        let ops_end = op_count
            .checked_mul(OP_HEADER_BYTES)
            .and_then(|n| n.checked_add(BODY_PREFIX_BYTES))
            .ok_or("op count overflows")?;
        if ops_end > raw.len() {
            return Err("op headers run past the body");
        }
        let body = BatchBody { raw, op_count };
        for i in 0..op_count {
            let op = body.op_unchecked(i).ok_or("unknown op kind")?;
            let start = op.data_offset as usize;
            let end = start
                .checked_add(op.data_len as usize)
                .ok_or("op data overflows")?;
            if start < ops_end || end > body.raw.len() {
                return Err("op data outside the body");
            }
            let data = &body.raw[start..end];
            match op.kind {
                OpKind::Append | OpKind::Rewrite | OpKind::Redact => {
                    if op.kind == OpKind::Redact && op.count != 1 {
                        return Err("redact must carry exactly one entry");
                    }
                    let table = (op.count as usize)
                        .checked_mul(4)
                        .ok_or("count overflows")?;
                    if table > data.len() {
                        return Err("entry offset table runs past the op data");
                    }
                    let payload_len = data.len() - table;
                    let mut prev = 0u32;
                    for k in 0..op.count as usize {
                        let end = u32_at(data, k * 4);
                        if end < prev || end as usize > payload_len {
                            return Err("entry end offsets out of order or out of bounds");
                        }
                        prev = end;
                    }
                    if prev as usize != payload_len {
                        return Err("entry payloads do not fill the op data");
                    }
                    if op.count == 0 {
                        return Err("entry op with no entries");
                    }
                    if op.index.checked_add(op.count as u64).is_none() {
                        return Err("entry indexes overflow");
                    }
                }
                OpKind::PutMeta | OpKind::DeleteMeta => {
                    if op.count as usize > data.len() {
                        return Err("meta key runs past the op data");
                    }
                }
                OpKind::TruncateAfter | OpKind::PurgeBefore => {}
            }
        }
        Ok(body)
    }

    fn op_unchecked(&self, i: usize) -> Option<OpHeader> {
        let b = &self.raw[BODY_PREFIX_BYTES + i * OP_HEADER_BYTES..][..OP_HEADER_BYTES];
        Some(OpHeader {
            kind: OpKind::from_u8(b[0])?,
            count: u32_at(b, 4),
            log_id: u64_at(b, 8),
            index: u64_at(b, 16),
            aux: u64_at(b, 24),
            data_offset: u32_at(b, 32),
            data_len: u32_at(b, 36),
        })
    }

    pub fn op_count(&self) -> usize {
        self.op_count
    }

    /// Bytes of the raw body.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// True for a body of no bytes (never the case for a parsed body).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn op(&self, i: usize) -> OpHeader {
        self.op_unchecked(i)
            .expect("op kinds were checked by parse")
    }

    fn data(&self, op: &OpHeader) -> Bytes {
        self.raw
            .slice(op.data_offset as usize..(op.data_offset + op.data_len) as usize)
    }

    /// Payload of entry `k` (0-based) of an entries op, sharing the body's buffer.
    pub fn entry(&self, op: &OpHeader, k: usize) -> Bytes {
        debug_assert!(op.kind.carries_entries() && k < op.count as usize);
        let data = self.data(op);
        let table = op.count as usize * 4;
        let start = if k == 0 {
            0
        } else {
            u32_at(&data, (k - 1) * 4) as usize
        };
        let end = u32_at(&data, k * 4) as usize;
        data.slice(table + start..table + end)
    }

    /// Key and value of a meta op (value empty for delete).
    pub fn meta(&self, op: &OpHeader) -> (Bytes, Bytes) {
        let data = self.data(op);
        let key_len = op.count as usize;
        (data.slice(..key_len), data.slice(key_len..))
    }
}

/// Decodes a record body from disk bytes: checks the body CRC, decompresses if flagged and
/// checks the raw length.
pub fn decode_body(header: &RecordHeader, on_disk: Bytes) -> Result<Bytes, &'static str> {
    if on_disk.len() != header.body_len as usize {
        return Err("record body truncated");
    }
    if crc32fast::hash(&on_disk) != header.body_crc {
        return Err("record body checksum mismatch");
    }
    if header.flags & RECORD_FLAG_LZ4 != 0 {
        if header.raw_len as usize > crate::config::WRITE_BATCH_BYTES_MAX {
            return Err("record raw length over the batch limit");
        }
        let mut out = vec![0u8; header.raw_len as usize];
        let n = lz4_flex::block::decompress_into(&on_disk, &mut out)
            .map_err(|_| "record body does not decompress")?;
        if n != out.len() {
            return Err("record body decompressed to the wrong length");
        }
        Ok(Bytes::from(out))
    } else {
        if header.raw_len != header.body_len {
            return Err("uncompressed record with raw length != body length");
        }
        Ok(on_disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_rejects_flips() {
        let h = SegmentHeader {
            segment_id: 42,
            salt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..32 {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                SegmentHeader::decode(&c).is_err(),
                "flip at byte {i} accepted"
            );
        }
    }

    #[test]
    fn record_header_is_bound_to_its_salt() {
        let h = RecordHeader {
            kind: RECORD_KIND_BATCH,
            flags: 0,
            body_len: 10,
            raw_len: 10,
            body_crc: 7,
            record_seq: 99,
            write_offset: 4096,
        };
        let mut b = [0u8; RECORD_HEADER_BYTES];
        h.encode_into(1, &mut b);
        assert_eq!(RecordHeader::decode(1, &b), Some(h));
        assert_eq!(
            RecordHeader::decode(2, &b),
            None,
            "other salt must not validate"
        );
        for i in 0..RECORD_HEADER_BYTES {
            let mut c = b;
            c[i] ^= 1;
            assert_eq!(
                RecordHeader::decode(1, &c),
                None,
                "flip at byte {i} accepted"
            );
        }
    }

    #[test]
    fn body_parse_rejects_short_and_overlong_tables() {
        assert!(BatchBody::parse(Bytes::from_static(&[1, 0, 0])).is_err());
        // One op header claiming more ops than fit.
        let mut b = vec![0u8; 8];
        b[0] = 2;
        assert!(BatchBody::parse(Bytes::from(b)).is_err());
    }
}
