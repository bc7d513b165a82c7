//! The checkpoint: the whole in-memory index (bounds, spans, overrides, metadata, segment
//! counts) as of the start of segment `replay_from`. Written at each segment seal, so a
//! restart reads it and replays only the segments from `replay_from` on: restart time
//! does not grow with the data retained.
//!
//! ```text
//! checkpoint  (replaced atomically: checkpoint.tmp, fdatasync, rename, directory sync)
//!   header (48 bytes)
//!      0 magic [u8; 8] b"CHLGCKP\0"   8 version u32 (1)   12 reserved u32
//!     16 replay_from u64             24 next_record_seq u64
//!     32 body_len u32                36 body_crc u32      40 reserved u32
//!     44 header_crc u32 over [0, 44)
//!   body
//!     segment_count u64, then per segment: id u64, total u64, live u64, redacted u64
//!     log_count u64, then per log:
//!       log_id u64, first u64, next u64, anchored u64 (0/1)
//!       span_count u64, spans: first u64, last u64, segment u64
//!       override_count u64, overrides: index u64, segment u64, offset u32, op u32
//!       meta_count u64, meta: key_len u32, key, value_len u32, value
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;

use crate::LogId;
use crate::error::{Error, Result};
use crate::index::{Bounds, Location, LogState, SegmentCounts, Span};
use crate::loghash::LogMap;

const MAGIC: [u8; 8] = *b"CHLGCKP\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 48;

/// What a checkpoint holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Checkpoint {
    pub replay_from: u64,
    pub next_record_seq: u64,
    pub counts: BTreeMap<u64, SegmentCounts>,
    pub logs: LogMap<LogId, LogState>,
}

struct Out(Vec<u8>);
impl Out {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct In<'a> {
    b: &'a [u8],
    at: usize,
}
impl In<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("length overflows")?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or("checkpoint body ends early")?;
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> std::result::Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn u32(&mut self) -> std::result::Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn count(&mut self, item_bytes: usize) -> std::result::Result<usize, &'static str> {
        let n = self.u64()? as usize;
        // Check the count against what is left before anything is allocated for it.
        if n.checked_mul(item_bytes)
            .is_none_or(|need| need > self.b.len() - self.at)
        {
            return Err("count larger than the checkpoint body");
        }
        Ok(n)
    }
    fn bytes(&mut self) -> std::result::Result<Bytes, &'static str> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(1 << 16));
        o.u64(self.counts.len() as u64);
        for (id, c) in &self.counts {
            o.u64(*id);
            o.u64(c.total);
            o.u64(c.live);
            o.u64(c.redacted);
        }
        let mut logs: Vec<_> = self.logs.iter().collect();
        logs.sort_by_key(|(id, _)| **id);
        o.u64(logs.len() as u64);
        for (id, l) in logs {
            o.u64(*id);
            o.u64(l.bounds.first);
            o.u64(l.bounds.next);
            o.u64(l.bounds.anchored as u64);
            o.u64(l.spans.len() as u64);
            for s in &l.spans {
                o.u64(s.first);
                o.u64(s.last);
                o.u64(s.segment);
            }
            o.u64(l.overrides.len() as u64);
            for (index, loc) in &l.overrides {
                o.u64(*index);
                o.u64(loc.segment);
                o.u32(loc.offset);
                o.u32(loc.op as u32);
            }
            o.u64(l.meta.len() as u64);
            for (k, v) in &l.meta {
                o.bytes(k);
                o.bytes(v);
            }
        }
        let body = o.0;
        let mut out = vec![0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.replay_from.to_le_bytes());
        out[24..32].copy_from_slice(&self.next_record_seq.to_le_bytes());
        out[32..36].copy_from_slice(&(body.len() as u32).to_le_bytes());
        out[36..40].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let crc = crc32fast::hash(&out[0..44]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub(crate) fn decode(path: &Path, b: &[u8]) -> Result<Checkpoint> {
        let bad = |at: usize, d: &str| Error::corruption(path, at as u64, d);
        if b.len() < HEADER_BYTES || b[0..8] != MAGIC {
            return Err(bad(0, "bad checkpoint magic"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
        if crc32fast::hash(&b[0..44]) != u32_at(44) {
            return Err(bad(0, "checkpoint header checksum mismatch"));
        }
        if u32_at(8) != VERSION {
            return Err(bad(8, "unsupported checkpoint version"));
        }
        let body = &b[HEADER_BYTES..];
        if body.len() != u32_at(32) as usize || crc32fast::hash(body) != u32_at(36) {
            return Err(bad(
                HEADER_BYTES,
                "checkpoint body length or checksum mismatch",
            ));
        }
        let mut cp = Checkpoint {
            replay_from: u64_at(16),
            next_record_seq: u64_at(24),
            ..Checkpoint::default()
        };
        let mut r = In { b: body, at: 0 };
        let mut parse = || -> std::result::Result<(), &'static str> {
            for _ in 0..r.count(32)? {
                let id = r.u64()?;
                let c = SegmentCounts {
                    total: r.u64()?,
                    live: r.u64()?,
                    redacted: r.u64()?,
                };
                cp.counts.insert(id, c);
            }
            for _ in 0..r.count(8)? {
                let id = r.u64()?;
                let mut l = LogState {
                    bounds: Bounds {
                        first: r.u64()?,
                        next: r.u64()?,
                        anchored: r.u64()? != 0,
                    },
                    ..LogState::default()
                };
                for _ in 0..r.count(24)? {
                    l.spans.push_back(Span {
                        first: r.u64()?,
                        last: r.u64()?,
                        segment: r.u64()?,
                    });
                }
                for _ in 0..r.count(24)? {
                    let index = r.u64()?;
                    let segment = r.u64()?;
                    let offset = r.u32()?;
                    let op = u16::try_from(r.u32()?).map_err(|_| "override op over u16")?;
                    l.overrides.insert(
                        index,
                        Location {
                            segment,
                            offset,
                            op,
                        },
                    );
                }
                for _ in 0..r.count(8)? {
                    let k = r.bytes()?;
                    let v = r.bytes()?;
                    l.meta.insert(k, v);
                }
                cp.logs.insert(id, l);
            }
            if r.at != r.b.len() {
                return Err("trailing bytes after the checkpoint body");
            }
            Ok(())
        };
        parse().map_err(|d| bad(HEADER_BYTES, d))?;
        Ok(cp)
    }
}
