//! Write batches: what a caller builds, and its encoding into a record body. Encoding
//! (copy, LZ4, body CRC) runs on the submitting thread so the I/O thread only validates,
//! places and writes.

use bytes::Bytes;

use crate::LogId;
use crate::config::{META_KEY_BYTES_MAX, META_VALUE_BYTES_MAX, WRITE_BATCH_OPS_MAX};
use crate::error::{Error, Result};
use crate::format::{
    BODY_PREFIX_BYTES, OP_HEADER_BYTES, OpHeader, OpKind, RECORD_FLAG_LZ4, RECORD_HEADER_BYTES,
    align_up,
};

/// One operation being built.
#[derive(Debug, Clone)]
struct OpDraft {
    kind: OpKind,
    log_id: LogId,
    index: u64,
    aux: u64,
    /// Where this op's entry end offsets start in `WriteBatch::ends` (they run to the
    /// next op's `ends_start`, or to the end for the last op; entries ops only).
    ends_start: usize,
    /// Where this op's bytes start in `WriteBatch::payload`.
    payload_start: usize,
    /// Key length for meta ops.
    key_len: usize,
}

/// A set of operations on many logs, written as one record: all of it is durable, or none.
///
/// Operations apply in the order they were added. Appends to a log must continue it
/// (`first_index == last + 1`, or any index for a log that never held an entry);
/// `truncate_after` first if a suffix must be replaced.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    ops: Vec<OpDraft>,
    payload: Vec<u8>,
    /// Every entry's end offset, relative to its op's `payload_start`, in op order: one
    /// vector for the whole batch rather than one per op (a batch spread over hundreds of
    /// logs has hundreds of ops, and an allocation each showed in profiles).
    ends: Vec<u32>,
    entries: usize,
}

/// What the I/O thread needs to know of one op to validate it and update the index.
#[derive(Debug, Clone)]
pub(crate) struct OpSummary {
    pub kind: OpKind,
    pub log_id: LogId,
    pub index: u64,
    pub count: u32,
    pub aux: u64,
    /// Meta key and value (empty for other ops).
    pub key: Bytes,
    pub value: Bytes,
    /// Bytes of the op's data (an append's payloads and their lengths), for the per-log
    /// size estimate (`Engine::log_disk_bytes`).
    pub data_len: u32,
}

/// A batch encoded as a whole record, ready for the committer: `record` holds
/// [`RECORD_HEADER_BYTES`] left for the header (the committer fills them in once it knows
/// the record's sequence number and place), the body, then zero padding to
/// [`RECORD_ALIGN`](crate::format::RECORD_ALIGN). The committer writes `record` as it is,
/// one iovec of a vectored write, so the body is never copied again in user space.
#[derive(Debug)]
pub(crate) struct EncodedBatch {
    pub record: Vec<u8>,
    /// Bytes of the body on disk (after compression, if any).
    pub body_len: u32,
    pub raw_len: u32,
    pub flags: u8,
    pub body_crc: u32,
    pub ops: Vec<OpSummary>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// An empty batch with room for `entries` entries of `payload_bytes` bytes in all, so
    /// that building it never reallocates (each reallocation copies every payload byte
    /// added so far: growing from empty to 64 KiB copies the payloads about once more).
    pub fn with_capacity(entries: usize, payload_bytes: usize) -> WriteBatch {
        WriteBatch {
            ops: Vec::with_capacity(entries),
            payload: Vec::with_capacity(payload_bytes),
            ends: Vec::with_capacity(entries),
            entries: 0,
        }
    }

    /// Entry end offsets of op `i`.
    fn op_ends(&self, i: usize) -> &[u32] {
        let end = self
            .ops
            .get(i + 1)
            .map_or(self.ends.len(), |o| o.ends_start);
        &self.ends[self.ops[i].ends_start..end]
    }

    /// True if the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of entries appended, rewritten or redacted in the batch.
    pub fn entry_count(&self) -> usize {
        self.entries
    }

    /// Raw bytes the encoded body will take (before compression).
    pub fn encoded_len(&self) -> usize {
        BODY_PREFIX_BYTES + self.ops.len() * OP_HEADER_BYTES + self.payload.len() + self.entries * 4
    }

    /// Appends one entry at `index` to `log`. Consecutive entries of one log in one batch
    /// share an operation.
    pub fn append(&mut self, log: LogId, index: u64, payload: &[u8]) {
        self.push_entry(OpKind::Append, log, index, 0, payload);
    }

    /// Appends entries at `first_index`, `first_index + 1`, …
    pub fn append_many<I, P>(&mut self, log: LogId, first_index: u64, payloads: I)
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        for (k, p) in payloads.into_iter().enumerate() {
            self.append(log, first_index + k as u64, p.as_ref());
        }
    }

    /// Removes every entry after `index` (keeps `index`).
    pub fn truncate_after(&mut self, log: LogId, index: u64) {
        self.push_plain(OpKind::TruncateAfter, log, index);
    }

    /// s7raft, "reset log start": makes an EMPTY log continue at `next` (any index, lower
    /// than its first too), written as `truncate_after(next - 1)`, which the engine
    /// accepts below the first index only when the log is empty at that point of the
    /// batch (so it never drops an entry; on a non-empty log it is refused like any
    /// truncate below the first index). Upwards it is `purge_before(next)`.
    pub fn reset_log_start(&mut self, log: LogId, next: u64) {
        self.truncate_after(log, next.saturating_sub(1));
    }

    /// Removes every entry before `index` (keeps `index`). Purging past the end leaves the
    /// log empty, to continue at `index`.
    pub fn purge_before(&mut self, log: LogId, index: u64) {
        self.push_plain(OpKind::PurgeBefore, log, index);
    }

    /// Replaces the payload of entry `index`. The old bytes leave the disk when their
    /// segment is compacted.
    pub fn redact(&mut self, log: LogId, index: u64, payload: &[u8]) {
        self.push_entry(OpKind::Redact, log, index, 0, payload);
        // A redact never merges with a neighbour: each is its own op.
        self.ops.last_mut().expect("just pushed").aux = 0;
    }

    /// Sets a small durable metadata value of `log` (a Raft vote, a checkpoint mark).
    pub fn put_meta(&mut self, log: LogId, key: &[u8], value: &[u8]) {
        self.push_meta(OpKind::PutMeta, log, key, value);
    }

    /// Removes a metadata key of `log`.
    pub fn delete_meta(&mut self, log: LogId, key: &[u8]) {
        self.push_meta(OpKind::DeleteMeta, log, key, &[]);
    }

    /// Compaction: rewrites entries of `log` that live in segment `source` here.
    pub(crate) fn rewrite(&mut self, log: LogId, index: u64, source: u64, payload: &[u8]) {
        self.push_entry(OpKind::Rewrite, log, index, source, payload);
    }

    fn push_entry(&mut self, kind: OpKind, log: LogId, index: u64, aux: u64, payload: &[u8]) {
        let extend = kind != OpKind::Redact
            && self.ops.last().is_some_and(|op| {
                op.kind == kind
                    && op.log_id == log
                    && op.aux == aux
                    && op.index + (self.ends.len() - op.ends_start) as u64 == index
            });
        if !extend {
            self.ops.push(OpDraft {
                kind,
                log_id: log,
                index,
                aux,
                ends_start: self.ends.len(),
                payload_start: self.payload.len(),
                key_len: 0,
            });
        }
        self.payload.extend_from_slice(payload);
        let op = self.ops.last().expect("an op exists");
        let end = self.payload.len() - op.payload_start;
        self.ends.push(u32::try_from(end).unwrap_or(u32::MAX));
        self.entries += 1;
    }

    fn push_plain(&mut self, kind: OpKind, log: LogId, index: u64) {
        self.ops.push(OpDraft {
            kind,
            log_id: log,
            index,
            aux: 0,
            ends_start: self.ends.len(),
            payload_start: self.payload.len(),
            key_len: 0,
        });
    }

    fn push_meta(&mut self, kind: OpKind, log: LogId, key: &[u8], value: &[u8]) {
        let payload_start = self.payload.len();
        self.payload.extend_from_slice(key);
        self.payload.extend_from_slice(value);
        self.ops.push(OpDraft {
            kind,
            log_id: log,
            index: 0,
            aux: 0,
            ends_start: self.ends.len(),
            payload_start,
            key_len: key.len(),
        });
    }

    /// Checks limits and encodes the body. `bytes_max` is the raw body limit of the engine.
    pub(crate) fn encode(&self, bytes_max: usize, compress_min: usize) -> Result<EncodedBatch> {
        let raw_len = self.encoded_len();
        if raw_len > bytes_max {
            return Err(Error::TooLarge {
                what: "write batch",
                size: raw_len as u64,
                limit: bytes_max as u64,
            });
        }
        if self.ops.len() > WRITE_BATCH_OPS_MAX {
            return Err(Error::TooLarge {
                what: "write batch op count",
                size: self.ops.len() as u64,
                limit: WRITE_BATCH_OPS_MAX as u64,
            });
        }
        // The record: header room, the raw body, padding, in one allocation of its final
        // size. Only the header room, the body prefix and the op headers are zero-filled
        // up front; the op data (entry ends and payloads) is appended once, in order, so
        // the payload bytes are written once here rather than zeroed and then copied.
        let heads = BODY_PREFIX_BYTES + self.ops.len() * OP_HEADER_BYTES;
        let mut record = Vec::with_capacity(align_up(RECORD_HEADER_BYTES + raw_len));
        record.resize(RECORD_HEADER_BYTES + heads, 0);
        record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + 4]
            .copy_from_slice(&(self.ops.len() as u32).to_le_bytes());
        let mut ops = Vec::with_capacity(self.ops.len());
        for (i, (op, next_start)) in self
            .ops
            .iter()
            .zip(
                self.ops
                    .iter()
                    .skip(1)
                    .map(|o| o.payload_start)
                    .chain([self.payload.len()]),
            )
            .enumerate()
        {
            let bytes = &self.payload[op.payload_start..next_start];
            let data_start = record.len() - RECORD_HEADER_BYTES;
            let (count, key, value) = match op.kind {
                OpKind::Append | OpKind::Rewrite | OpKind::Redact => {
                    let ends = self.op_ends(i);
                    extend_u32_le(&mut record, ends);
                    (ends.len() as u32, Bytes::new(), Bytes::new())
                }
                OpKind::PutMeta | OpKind::DeleteMeta => {
                    let (k, v) = bytes.split_at(op.key_len);
                    if k.len() > META_KEY_BYTES_MAX || k.is_empty() {
                        return Err(Error::InvalidWrite {
                            log: op.log_id,
                            reason: format!(
                                "meta key of {} bytes (must be 1..={META_KEY_BYTES_MAX})",
                                k.len()
                            ),
                        });
                    }
                    if v.len() > META_VALUE_BYTES_MAX {
                        return Err(Error::TooLarge {
                            what: "meta value",
                            size: v.len() as u64,
                            limit: META_VALUE_BYTES_MAX as u64,
                        });
                    }
                    (
                        k.len() as u32,
                        Bytes::copy_from_slice(k),
                        Bytes::copy_from_slice(v),
                    )
                }
                OpKind::TruncateAfter | OpKind::PurgeBefore => (0, Bytes::new(), Bytes::new()),
            };
            record.extend_from_slice(bytes);
            let data_end = record.len() - RECORD_HEADER_BYTES;
            let header = OpHeader {
                kind: op.kind,
                count,
                log_id: op.log_id,
                index: op.index,
                aux: op.aux,
                data_offset: data_start as u32,
                data_len: (data_end - data_start) as u32,
            };
            header.encode_into(
                &mut record[RECORD_HEADER_BYTES + BODY_PREFIX_BYTES + i * OP_HEADER_BYTES..],
            );
            ops.push(OpSummary {
                kind: op.kind,
                log_id: op.log_id,
                index: op.index,
                count,
                aux: op.aux,
                key,
                value,
                data_len: header.data_len,
            });
        }
        debug_assert_eq!(record.len(), RECORD_HEADER_BYTES + raw_len);
        record.resize(align_up(RECORD_HEADER_BYTES + raw_len), 0);
        let body = &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + raw_len];
        let mut flags = 0;
        let mut body_len = raw_len;
        if compress_min > 0 && raw_len >= compress_min && compression_may_pay(body) {
            let compressed = lz4_flex::block::compress(body);
            // Keep it only if it saves at least an eighth: otherwise reads pay for nothing.
            if compressed.len() <= raw_len - raw_len / 8 {
                body_len = compressed.len();
                record.truncate(RECORD_HEADER_BYTES);
                record.extend_from_slice(&compressed);
                record.resize(align_up(RECORD_HEADER_BYTES + body_len), 0);
                flags |= RECORD_FLAG_LZ4;
            }
        }
        let body_crc =
            crc32fast::hash(&record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + body_len]);
        Ok(EncodedBatch {
            record,
            body_len: body_len as u32,
            raw_len: raw_len as u32,
            flags,
            body_crc,
            ops,
        })
    }
}

/// Appends `values` as little-endian u32s: one copy of the slice's bytes on little-endian
/// targets (a push per value showed in profiles of `encode`).
fn extend_u32_le(out: &mut Vec<u8>, values: &[u32]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: a `u32` slice is `4 * len` initialised bytes with no padding, valid for
        // reads for the slice's lifetime; on a little-endian target those bytes are the
        // values' little-endian encodings.
        let bytes =
            unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 4) };
        out.extend_from_slice(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Bytes of a body LZ4 tries first to decide whether compressing the whole body may pay.
/// 4 KiB compresses in about a microsecond and sees enough of the payloads (chat text
/// compresses well at any 4 KiB; random or already compressed media at none); a whole
/// 64 KiB body that fails to compress costs ~15x that, on every batch.
pub const COMPRESS_SAMPLE_BYTES: usize = 4096;

/// Whether LZ4 on `body` can save the eighth [`WriteBatch::encode`] asks for, judged from
/// a [`COMPRESS_SAMPLE_BYTES`] sample at the body's end (the payload bytes: op headers at
/// the start compress well whatever the payloads are). A sample that saves less than a
/// sixteenth says no. A wrong "no" only loses some compression, never data.
fn compression_may_pay(body: &[u8]) -> bool {
    if body.len() <= 2 * COMPRESS_SAMPLE_BYTES {
        return true;
    }
    let sample = &body[body.len() - COMPRESS_SAMPLE_BYTES..];
    lz4_flex::block::compress(sample).len() <= COMPRESS_SAMPLE_BYTES - COMPRESS_SAMPLE_BYTES / 16
}

impl EncodedBatch {
    /// The record body (what `body_crc` covers).
    #[cfg(test)]
    pub(crate) fn body(&self) -> &[u8] {
        &self.record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + self.body_len as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BatchBody;

    #[test]
    fn encoded_batch_parses_back() {
        let mut b = WriteBatch::new();
        b.append(7, 1, b"one");
        b.append(7, 2, b"two");
        b.append(9, 5, b"");
        b.put_meta(7, b"vote", b"\x01\x02");
        b.truncate_after(9, 5);
        b.redact(7, 1, b"x");
        let e = b.encode(1 << 20, 0).expect("encodes");
        let body = BatchBody::parse(Bytes::copy_from_slice(e.body())).expect("parses");
        assert_eq!(body.op_count(), 5);
        let op = body.op(0);
        assert_eq!(
            (op.kind, op.log_id, op.index, op.count),
            (OpKind::Append, 7, 1, 2)
        );
        assert_eq!(&body.entry(&op, 0)[..], b"one");
        assert_eq!(&body.entry(&op, 1)[..], b"two");
        let op = body.op(1);
        assert_eq!(&body.entry(&op, 0)[..], b"");
        let (k, v) = body.meta(&body.op(2));
        assert_eq!((&k[..], &v[..]), (&b"vote"[..], &b"\x01\x02"[..]));
        assert_eq!(body.op(3).kind, OpKind::TruncateAfter);
        assert_eq!(&body.entry(&body.op(4), 0)[..], b"x");
    }

    #[test]
    fn a_presized_batch_encodes_byte_for_byte_like_a_grown_one() {
        // The flat `ends` vector must give each op exactly its own entries, whatever
        // mix of ops and logs precedes it.
        let build = |b: &mut WriteBatch| {
            for i in 0..40u64 {
                b.append(i % 3, i / 3 + 1, &vec![i as u8; (i as usize * 7) % 300]);
            }
            b.put_meta(1, b"k", b"v");
            b.redact(2, 1, b"gone");
            b.append_many(5, 10, [&b"a"[..], b"bb", b"ccc"]);
            b.truncate_after(5, 11);
            b.append(5, 12, b"dddd");
        };
        let mut grown = WriteBatch::new();
        build(&mut grown);
        let mut sized = WriteBatch::with_capacity(64, 16 << 10);
        build(&mut sized);
        let (g, s) = (
            grown.encode(1 << 20, 0).expect("encodes"),
            sized.encode(1 << 20, 0).expect("encodes"),
        );
        assert_eq!(g.record, s.record);
        let body = BatchBody::parse(Bytes::copy_from_slice(s.body())).expect("parses");
        let op = body.op(body.op_count() - 1);
        assert_eq!((op.log_id, op.index, op.count), (5, 12, 1));
        assert_eq!(&body.entry(&op, 0)[..], b"dddd");
        let op = body.op(body.op_count() - 3);
        assert_eq!((op.log_id, op.index, op.count), (5, 10, 3));
        assert_eq!(&body.entry(&op, 2)[..], b"ccc");
        assert_eq!(s.body_crc, crc32fast::hash(s.body()));
    }

    #[test]
    fn oversize_batch_is_refused_before_encoding() {
        let mut b = WriteBatch::new();
        b.append(1, 1, &[0u8; 2000]);
        assert!(matches!(b.encode(1000, 0), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn compressible_batches_are_compressed() {
        let mut b = WriteBatch::new();
        for i in 0..100 {
            b.append(1, i + 1, &[b'a'; 300]);
        }
        let e = b.encode(1 << 20, 1024).expect("encodes");
        assert_eq!(e.flags & RECORD_FLAG_LZ4, RECORD_FLAG_LZ4);
        assert!(e.body().len() < e.raw_len as usize / 4);
        assert_eq!(
            e.record.len(),
            align_up(RECORD_HEADER_BYTES + e.body().len())
        );
        let body = lz4_flex::block::decompress(e.body(), e.raw_len as usize).expect("lz4");
        assert_eq!(
            BatchBody::parse(Bytes::from(body))
                .expect("parses")
                .op_count(),
            1
        );
    }

    #[test]
    fn incompressible_batches_skip_lz4_and_keep_their_bytes() {
        use rand::RngCore;
        let mut rng = rand::rng();
        let mut b = WriteBatch::new();
        for i in 0..256 {
            let mut p = [0u8; 256];
            rng.fill_bytes(&mut p);
            b.append(i % 7, i / 7 + 1, &p);
        }
        let e = b.encode(1 << 20, 16 << 10).expect("encodes");
        assert_eq!(e.flags & RECORD_FLAG_LZ4, 0);
        assert_eq!(e.body_len, e.raw_len);
        assert!(!compression_may_pay(e.body()));
        assert_eq!(e.body_crc, crc32fast::hash(e.body()));
        // Header room and padding are zeros until the committer fills the header in.
        assert!(e.record[..RECORD_HEADER_BYTES].iter().all(|&x| x == 0));
        assert!(
            e.record[RECORD_HEADER_BYTES + e.body().len()..]
                .iter()
                .all(|&x| x == 0)
        );
        let body = BatchBody::parse(Bytes::copy_from_slice(e.body())).expect("parses");
        assert_eq!(body.op_count(), b.ops.len());
    }
}
