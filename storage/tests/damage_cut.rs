//! `RecoveryMode::CutDamagedTail` (issue 9): a flipped byte in a synced record of the
//! newest segment, with later records after it, is cut at open instead of refused — the
//! damaged record and everything after it dropped, reported by `Engine::damage` (file,
//! offset, and per log what the dropped valid records held) — and the segment is sealed
//! at the damaged offset, so a later open (in any mode) never reads the dropped bytes
//! again and finds no damage. Writing goes on after the cut. Damage in an older segment
//! is still refused.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use chatlog_storage::format::{
    BatchBody, OpKind, RECORD_HEADER_BYTES, RecordHeader, SEGMENT_HEADER_BYTES, SegmentHeader,
    decode_body,
};
use chatlog_storage::{Config, Engine, Error, IoMode, RecoveryMode, WriteBatch};

const SEGMENT_BYTES: u64 = 256 << 10;

fn config(dir: &Path, mode: RecoveryMode) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = SEGMENT_BYTES;
    c.io_mode = IoMode::Syscall;
    c.compaction_interval_ms = 3_600_000;
    c.recovery_mode = mode;
    c
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

fn payload(log: u64, index: u64) -> Vec<u8> {
    format!("log {log} entry {index} {}", "x".repeat(300)).into_bytes()
}

/// Offsets of the valid records of a segment file and the highest index each appends
/// to each log.
fn records(path: &Path) -> Vec<(u64, Vec<(u64, u64)>)> {
    let bytes = std::fs::read(path).unwrap();
    let salt = SegmentHeader::decode(&bytes).unwrap().salt;
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_BYTES;
    while let Some(h) = bytes.get(at..).and_then(|b| RecordHeader::decode(salt, b)) {
        let start = at + RECORD_HEADER_BYTES;
        let raw = decode_body(
            &h,
            Bytes::copy_from_slice(&bytes[start..start + h.body_len as usize]),
        )
        .unwrap();
        let mut appends = Vec::new();
        if h.kind == chatlog_storage::format::RECORD_KIND_BATCH {
            let body = BatchBody::parse(raw).unwrap();
            for k in 0..body.op_count() {
                let op = body.op(k);
                if op.kind == OpKind::Append {
                    appends.push((op.log_id, op.index + u64::from(op.count) - 1));
                }
            }
        }
        out.push((at as u64, appends));
        at += h.record_bytes();
    }
    out
}

/// 30 batches, each appending one entry to logs 1 and 2 and, every third, a meta value of
/// log 3; the engine is closed with its segment still active.
fn thirty_batches(dir: &Path) {
    let engine = Engine::open(config(dir, RecoveryMode::TolerateTornTail)).unwrap();
    for k in 1..=30u64 {
        let mut b = WriteBatch::new();
        b.append(1, k, &payload(1, k));
        b.append(2, k, &payload(2, k));
        if k % 3 == 0 {
            b.put_meta(3, b"synced", &k.to_le_bytes());
        }
        engine.write_blocking(&b).unwrap();
    }
    engine.close().unwrap();
}

#[test]
fn a_flip_followed_by_later_writes_is_cut_reported_and_sealed_off() {
    let dir = tempfile::tempdir().unwrap();
    thirty_batches(dir.path());
    let seg = segment_path(dir.path(), 1);
    let recs = records(&seg);
    assert_eq!(recs.len(), 30);
    let (victim, _) = recs[20];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[(victim + RECORD_HEADER_BYTES as u64 + 50) as usize] ^= 0x04;
    std::fs::write(&seg, &bytes).unwrap();

    // The default still refuses it.
    let err = Engine::open(config(dir.path(), RecoveryMode::TolerateTornTail))
        .expect_err("damage refused by default");
    assert!(err.is_corruption(), "{err}");

    let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
    let damage = engine.damage().expect("the cut is reported").clone();
    assert_eq!(
        (damage.path.as_path(), damage.offset),
        (seg.as_path(), victim)
    );
    assert!(damage.detail.contains("later write"), "{}", damage.detail);
    // Records 22..=30 (valid, dropped) appended through index 30 and set log 3's marker
    // to 30; the damaged record 21 itself is unknown.
    assert_eq!(damage.logs[&1].last_index, Some(30));
    assert_eq!(damage.logs[&2].last_index, Some(30));
    assert_eq!(
        damage.logs[&3].meta[&Bytes::from_static(b"synced")],
        Some(Bytes::copy_from_slice(&30u64.to_le_bytes()))
    );
    // Everything before the damaged record is there, nothing after it.
    for log in [1, 2] {
        assert_eq!(engine.bounds(log).unwrap().next, 21, "log {log}");
        for k in 1..=20 {
            assert_eq!(engine.get(log, k).unwrap()[..], payload(log, k)[..]);
        }
    }
    assert_eq!(
        engine.meta(3, b"synced").as_deref(),
        Some(&18u64.to_le_bytes()[..])
    );
    // Writing goes on where the logs end (in a new segment: the damaged one is sealed).
    for k in 21..=25u64 {
        let mut b = WriteBatch::new();
        b.append(1, k, &payload(1, k + 1000));
        engine.write_blocking(&b).unwrap();
    }
    engine.close().unwrap();

    // Reopened (even strictly), the dropped bytes are never looked at again.
    let engine = Engine::open(config(dir.path(), RecoveryMode::Strict)).unwrap();
    assert!(engine.damage().is_none());
    assert_eq!(engine.bounds(1).unwrap().next, 26);
    assert_eq!(engine.bounds(2).unwrap().next, 21);
    for k in 21..=25 {
        assert_eq!(engine.get(1, k).unwrap()[..], payload(1, k + 1000)[..]);
    }
    engine.close().unwrap();
}

#[test]
fn damage_in_an_older_segment_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(config(dir.path(), RecoveryMode::TolerateTornTail)).unwrap();
        for k in 1..=10u64 {
            let mut b = WriteBatch::new();
            b.append(1, k, &payload(1, k));
            engine.write_blocking(&b).unwrap();
            if k == 5 {
                engine.rotate_blocking().unwrap();
            }
        }
        engine.close().unwrap();
    }
    // No checkpoint: the first segment is replayed, and later ones hold records.
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    let seg = segment_path(dir.path(), 1);
    let (victim, _) = records(&seg)[2];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[(victim + RECORD_HEADER_BYTES as u64 + 9) as usize] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail))
        .expect_err("damage before later segments is refused");
    match &err {
        Error::Corruption { file, offset, .. } => {
            assert_eq!((file.as_path(), *offset), (seg.as_path(), victim))
        }
        other => panic!("{other:?}"),
    }
}
