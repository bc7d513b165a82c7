//! `RecoveryMode::CutDamagedTail` (issue 9): a flipped byte in a synced record of the
//! newest segment, with later records after it, is cut at open instead of refused — the
//! damaged record and everything after it dropped, reported by `Engine::damage` (file,
//! offset, and per log what the dropped valid records held) — and the segment is sealed
//! at the damaged offset, so a later open (in any mode) never reads the dropped bytes
//! again and finds no damage. Writing goes on after the cut. Damage in an older segment,
//! a truncated segment file and a missing one are cut too (session 6): every log with
//! entries in the lost range ends before it, the others are untouched, and writes
//! continue the cut logs across a reopen.

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

/// Logs 1 and 2 get entries 1..=10, five per segment (segments 1 and 2); log 3 gets
/// entries 1..=5 in segment 2 only. With `checkpoint == false` the checkpoint is removed,
/// so recovery replays every segment.
fn two_segments(dir: &Path, checkpoint: bool) {
    let engine = Engine::open(config(dir, RecoveryMode::TolerateTornTail)).unwrap();
    for k in 1..=10u64 {
        let mut b = WriteBatch::new();
        b.append(1, k, &payload(1, k));
        b.append(2, k, &payload(2, k));
        if k > 5 {
            b.append(3, k - 5, &payload(3, k - 5));
        }
        engine.write_blocking(&b).unwrap();
        if k == 5 || (checkpoint && k == 10) {
            engine.rotate_blocking().unwrap();
        }
    }
    engine.close().unwrap();
    if !checkpoint {
        std::fs::remove_file(dir.join("checkpoint")).unwrap();
    }
}

/// Checks what an older-segment cut left and that writing goes on and survives a reopen.
fn cut_logs_continue(dir: &Path, held: u64) -> std::sync::Arc<chatlog_storage::Damage> {
    let engine = Engine::open(config(dir, RecoveryMode::CutDamagedTail)).unwrap();
    let damage = engine.damage().expect("the cut is reported").clone();
    for log in [1, 2] {
        assert_eq!(engine.bounds(log).unwrap().next, held + 1, "log {log}");
        for k in 1..=held {
            assert_eq!(engine.get(log, k).unwrap()[..], payload(log, k)[..]);
        }
        assert!(
            engine.get(log, held + 1).is_err(),
            "the lost range is not served"
        );
        assert_eq!(damage.lost_from.get(&log), Some(&(held + 1)), "{damage:?}");
    }
    // Log 3 lived in the later segment only: untouched.
    assert_eq!(engine.bounds(3).unwrap().next, 6);
    for k in 1..=5 {
        assert_eq!(engine.get(3, k).unwrap()[..], payload(3, k)[..]);
    }
    assert!(!damage.lost_from.contains_key(&3), "{damage:?}");
    // The cut logs continue where they end now (a replica repairing from its peers).
    for k in held + 1..=12 {
        let mut b = WriteBatch::new();
        b.append(1, k, &payload(1, k + 1000));
        engine.write_blocking(&b).unwrap();
    }
    engine.close().unwrap();
    // Reopened: the damage may be found again (until a checkpoint covers it), but the
    // pinned cut keeps what was written since.
    let engine = Engine::open(config(dir, RecoveryMode::CutDamagedTail)).unwrap();
    assert_eq!(engine.bounds(1).unwrap().next, 13);
    for k in held + 1..=12 {
        assert_eq!(engine.get(1, k).unwrap()[..], payload(1, k + 1000)[..]);
    }
    assert_eq!(engine.bounds(2).unwrap().next, held + 1);
    assert_eq!(engine.bounds(3).unwrap().next, 6);
    engine.close().unwrap();
    damage
}

#[test]
fn damage_in_an_older_segment_is_cut_and_the_logs_continue() {
    let dir = tempfile::tempdir().unwrap();
    two_segments(dir.path(), false);
    let seg = segment_path(dir.path(), 1);
    let (victim, _) = records(&seg)[2];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[(victim + RECORD_HEADER_BYTES as u64 + 9) as usize] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    // Without the cut mode it is refused, naming file and offset.
    let err = Engine::open(config(dir.path(), RecoveryMode::TolerateTornTail))
        .expect_err("damage before later segments is refused");
    match &err {
        Error::Corruption { file, offset, .. } => {
            assert_eq!((file.as_path(), *offset), (seg.as_path(), victim))
        }
        other => panic!("{other:?}"),
    }
    let damage = cut_logs_continue(dir.path(), 2);
    assert_eq!(
        (damage.path.as_path(), damage.offset),
        (seg.as_path(), victim)
    );
    // What the dropped and skipped records appended: through index 10.
    assert_eq!(damage.logs[&1].last_index, Some(10));
    assert!(!damage.sealed_at_offset);
}

#[test]
fn a_truncated_older_segment_is_cut_and_the_logs_continue() {
    let dir = tempfile::tempdir().unwrap();
    two_segments(dir.path(), false);
    let seg = segment_path(dir.path(), 1);
    let (victim, _) = records(&seg)[3];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.truncate(victim as usize);
    std::fs::write(&seg, &bytes).unwrap();
    let err = Engine::open(config(dir.path(), RecoveryMode::TolerateTornTail))
        .expect_err("a truncated segment is refused");
    assert!(err.to_string().contains("truncated"), "{err}");
    cut_logs_continue(dir.path(), 3);
}

#[test]
fn a_missing_segment_is_cut_and_the_logs_continue() {
    // Covered by the checkpoint: the index names the segment, the file is gone.
    let dir = tempfile::tempdir().unwrap();
    two_segments(dir.path(), true);
    assert!(dir.path().join("checkpoint").exists());
    std::fs::remove_file(segment_path(dir.path(), 1)).unwrap();
    let err = Engine::open(config(dir.path(), RecoveryMode::TolerateTornTail))
        .expect_err("a missing segment is refused");
    assert!(err.to_string().contains("missing"), "{err}");
    {
        let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
        let damage = engine.damage().expect("reported").clone();
        assert!(damage.detail.contains("missing"), "{damage:?}");
        // Logs 1 and 2 started in the missing segment: nothing of them is held.
        for log in [1, 2] {
            assert_eq!(damage.lost_from.get(&log), Some(&1), "{damage:?}");
            let b = engine.bounds(log).unwrap();
            assert!(b.is_empty(), "log {log}: {b:?}");
        }
        assert_eq!(engine.bounds(3).unwrap().next, 6);
        for k in 1..=5 {
            assert_eq!(engine.get(3, k).unwrap()[..], payload(3, k)[..]);
        }
        engine.close().unwrap();
    }
    // Not covered by a checkpoint: the later segment's records do not follow on.
    let dir = tempfile::tempdir().unwrap();
    two_segments(dir.path(), false);
    std::fs::remove_file(segment_path(dir.path(), 1)).unwrap();
    let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
    let damage = engine.damage().expect("reported").clone();
    for log in [1, 2] {
        assert!(damage.lost_from.contains_key(&log), "{damage:?}");
        assert!(
            engine.bounds(log).is_none_or(|b| b.is_empty()),
            "log {log} holds nothing it cannot prove dense"
        );
        assert!(engine.get(log, 6).is_err());
    }
    engine.close().unwrap();
}

#[test]
fn a_flip_found_by_a_read_stops_the_log_until_it_is_cut_before_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    // The checkpoint covers segment 1: open does not look at its records.
    two_segments(dir.path(), true);
    let seg = segment_path(dir.path(), 1);
    let (victim, _) = records(&seg)[2];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[(victim + RECORD_HEADER_BYTES as u64 + 9) as usize] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
    assert!(engine.damage().is_none(), "not found at open");
    assert!(engine.get(1, 2).is_ok());
    let err = engine
        .get(1, 3)
        .expect_err("the damaged entry is never served");
    assert!(err.is_corruption(), "{err}");
    // The log is stopped: no reads, no writes.
    assert!(engine.log_failure(1).is_some());
    assert!(engine.get(1, 1).is_err());
    let mut b = WriteBatch::new();
    b.append(1, 11, &payload(1, 11));
    assert!(
        engine.write_blocking(&b).is_err(),
        "a stopped log takes no writes"
    );
    // Cut before the damage, with the owner's meta in the same batch.
    let mut also = WriteBatch::new();
    also.put_meta(1, b"synced", &10u64.to_le_bytes());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let cut = rt.block_on(engine.cut_failed_log(1, also)).unwrap();
    assert_eq!(cut, Some(3));
    assert!(engine.log_failure(1).is_none());
    assert_eq!(engine.bounds(1).unwrap().next, 3);
    assert_eq!(engine.get(1, 2).unwrap()[..], payload(1, 2)[..]);
    assert!(engine.get(1, 3).is_err());
    assert_eq!(
        engine.meta(1, b"synced").as_deref(),
        Some(&10u64.to_le_bytes()[..])
    );
    // Log 2 shares the damaged record: stopped only once a read finds it.
    assert!(engine.get(2, 3).unwrap_err().is_corruption());
    assert_eq!(
        rt.block_on(engine.cut_failed_log(2, WriteBatch::new()))
            .unwrap(),
        Some(3)
    );
    // Writing goes on where the logs end, and survives a reopen.
    for k in 3..=12u64 {
        let mut b = WriteBatch::new();
        b.append(1, k, &payload(1, k + 1000));
        engine.write_blocking(&b).unwrap();
    }
    engine.close().unwrap();
    let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
    assert_eq!(engine.bounds(1).unwrap().next, 13);
    assert_eq!(engine.bounds(2).unwrap().next, 3);
    for k in 3..=12 {
        assert_eq!(engine.get(1, k).unwrap()[..], payload(1, k + 1000)[..]);
    }
    engine.close().unwrap();
}

/// Issue 9 (session 7): the NEWEST segment file cut short, missing, or headerless: the
/// engine opens under `CutDamagedTail` with the damage reported as `tail_lost` (nothing
/// after it says what it held), the cut-short file is refused under the other modes
/// naming the file, and the
/// logs continue where they end now, also across a reopen.
#[test]
fn the_newest_segment_cut_short_missing_or_headerless_is_reported_as_tail_lost() {
    for kind in ["cut short", "missing", "headerless"] {
        let dir = tempfile::tempdir().unwrap();
        two_segments(dir.path(), false);
        let seg = segment_path(dir.path(), 2);
        let held = match kind {
            "cut short" => {
                let (victim, _) = records(&seg)[3];
                let mut bytes = std::fs::read(&seg).unwrap();
                bytes.truncate(victim as usize);
                std::fs::write(&seg, &bytes).unwrap();
                8
            }
            "missing" => {
                std::fs::remove_file(&seg).unwrap();
                5
            }
            _ => {
                std::fs::write(&seg, [0u8; 10]).unwrap();
                5
            }
        };
        if kind == "cut short" {
            // Without the cut mode (a single-replica node) a cut-short file is refused,
            // naming the file; a missing or headerless newest file is not looked for.
            let err = Engine::open(config(dir.path(), RecoveryMode::TolerateTornTail))
                .expect_err("the newest segment cut short is refused without the cut mode");
            assert!(err.is_corruption(), "{kind}: {err}");
            assert!(
                err.to_string().contains(&seg.display().to_string()),
                "{kind}: {err}"
            );
        }
        let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
        let damage = engine.damage().expect("the loss is reported").clone();
        assert!(damage.tail_lost, "{kind}: {damage:?}");
        assert_eq!(damage.path, seg, "{kind}");
        for log in [1, 2] {
            assert_eq!(
                engine.bounds(log).unwrap().next,
                held + 1,
                "{kind}: log {log}"
            );
            for k in 1..=held {
                assert_eq!(engine.get(log, k).unwrap()[..], payload(log, k)[..]);
            }
        }
        for k in held + 1..=12 {
            let mut b = WriteBatch::new();
            b.append(1, k, &payload(1, k + 1000));
            engine.write_blocking(&b).unwrap();
        }
        engine.close().unwrap();
        let engine = Engine::open(config(dir.path(), RecoveryMode::CutDamagedTail)).unwrap();
        assert_eq!(engine.bounds(1).unwrap().next, 13, "{kind}");
        for k in held + 1..=12 {
            assert_eq!(
                engine.get(1, k).unwrap()[..],
                payload(1, k + 1000)[..],
                "{kind}"
            );
        }
        assert!(
            engine.damage().is_none_or(|d| !d.tail_lost),
            "{kind}: reported once, not at every open: {:?}",
            engine.damage()
        );
        engine.close().unwrap();
    }
}
