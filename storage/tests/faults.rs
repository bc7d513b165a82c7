//! Faults: every I/O error and every flipped bit must be caught and reported, never
//! returned as data or as a success.
//!
//! - Injected through `chatlog_storage::fault::FaultyFileSystem`: a failed write (EIO), a
//!   full disk (ENOSPC), a short write and a failed fdatasync each fail the write in
//!   flight, stop the engine (`Error::Stopped` afterwards), and a reopen on a healthy file
//!   system finds every acknowledged entry and no part of an unacknowledged batch; a
//!   seeded variant lands the fault on any write or sync (segment creation, index files,
//!   checkpoints). A bit flipped on read is a corruption error and stops the log.
//! - Written into real files: a flipped byte inside a synced record (sealed segment,
//!   active segment, checkpoint) is reported naming file and offset; a torn tail (zeroed
//!   or cut last record) is cut at open, or refused with `RecoveryMode::Strict`; garbage
//!   after the last record is ignored.
//!
//! Seeded parts print `seed=`; `CHATLOG_TEST_SEED=<n>` replays them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog_storage::fault::{FaultPlan, FaultyFileSystem};
use chatlog_storage::format::{
    BatchBody, OpKind, RECORD_HEADER_BYTES, RecordHeader, SEGMENT_HEADER_BYTES, SegmentHeader,
    decode_body,
};
use chatlog_storage::{Config, Engine, Error, IoMode, RecoveryMode, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEGMENT_BYTES: u64 = 256 << 10;

fn config(dir: &Path) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = SEGMENT_BYTES;
    c.io_mode = IoMode::Syscall;
    c.compaction_interval_ms = 3_600_000;
    c
}

fn seed() -> u64 {
    common::seed()
}

fn entry(log: u64, index: u64, len: usize) -> Vec<u8> {
    let mut v = format!("log {log} entry {index} ").into_bytes();
    let mut x = log.wrapping_mul(31).wrapping_add(index);
    while v.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.push((x >> 56) as u8);
    }
    v.truncate(len.max(1));
    v
}

/// What the test knows was acknowledged, per log: index → payload.
type Acked = BTreeMap<u64, BTreeMap<u64, Vec<u8>>>;

/// Appends one entry of `len` bytes to each of `logs`, continuing them.
fn batch_for(acked: &Acked, logs: &[u64], len: usize) -> (WriteBatch, Vec<(u64, u64, Vec<u8>)>) {
    let mut b = WriteBatch::new();
    let mut items = Vec::new();
    for &log in logs {
        let index = acked
            .get(&log)
            .and_then(|m| m.keys().next_back())
            .map_or(1, |i| i + 1);
        let p = entry(log, index, len);
        b.append(log, index, &p);
        items.push((log, index, p));
    }
    (b, items)
}

fn ack(acked: &mut Acked, items: Vec<(u64, u64, Vec<u8>)>) {
    for (log, index, p) in items {
        acked.entry(log).or_default().insert(index, p);
    }
}

/// Every acknowledged entry is there, intact, and each log is dense.
fn check_acked(engine: &Engine, acked: &Acked) {
    for (log, entries) in acked {
        let b = engine
            .bounds(*log)
            .unwrap_or_else(|| panic!("log {log} lost"));
        let last = *entries.keys().next_back().expect("non-empty");
        assert!(
            b.first <= 1 && b.next > last,
            "log {log} holds [{}, {}), acked up to {last}",
            b.first,
            b.next
        );
        for index in b.first..b.next {
            let got = engine
                .get(*log, index)
                .unwrap_or_else(|e| panic!("log {log} entry {index}: {e}"));
            if let Some(want) = entries.get(&index) {
                assert_eq!(got[..], want[..], "log {log} entry {index}");
            }
        }
    }
}

/// An unacknowledged batch after a reopen: wholly there or wholly absent, never in part.
/// Returns whether it is there.
fn all_or_nothing(engine: &Engine, items: &[(u64, u64, Vec<u8>)]) -> bool {
    let present: Vec<bool> = items
        .iter()
        .map(|(log, index, p)| match engine.get(*log, *index) {
            Ok(got) => {
                assert_eq!(
                    got[..],
                    p[..],
                    "unacknowledged entry {log}/{index} holds other bytes"
                );
                true
            }
            Err(Error::OutOfRange { .. }) => false,
            Err(e) => panic!("unacknowledged entry {log}/{index}: {e}"),
        })
        .collect();
    assert!(
        present.iter().all(|p| *p) || present.iter().all(|p| !*p),
        "an unacknowledged batch is half-visible: {present:?}"
    );
    present.first().copied().unwrap_or(false)
}

/// Waits (polling a counter, bounded) until the background I/O that opening a fresh
/// directory starts has happened: the first two segments created (a header write and a
/// sync each; with `Preallocation::ZeroFill` also a zero-fill write) and the first
/// checkpoint written (one write, one sync). Only then does the next write or sync belong
/// to the write path, where the tests aim.
fn wait_for_open_io(plan: &FaultPlan) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let writes = match config(Path::new("/")).preallocation {
        chatlog_storage::Preallocation::ZeroFill => 5,
        _ => 3,
    };
    while plan.writes.load(Ordering::SeqCst) < writes || plan.syncs.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "background I/O of open never finished"
        );
        std::thread::yield_now();
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    WriteEio,
    NoSpace,
    ShortWrite,
    SyncEio,
}

fn arm(plan: &FaultPlan, fault: Fault, after: u64) {
    let counter = match fault {
        Fault::WriteEio => &plan.fail_write_after,
        Fault::NoSpace => &plan.no_space_after,
        Fault::ShortWrite => &plan.short_write_after,
        Fault::SyncEio => &plan.fail_sync_after,
    };
    counter.store(after, Ordering::SeqCst);
}

fn fired(plan: &FaultPlan, fault: Fault) -> bool {
    let counter = match fault {
        Fault::WriteEio => &plan.fail_write_after,
        Fault::NoSpace => &plan.no_space_after,
        Fault::ShortWrite => &plan.short_write_after,
        Fault::SyncEio => &plan.fail_sync_after,
    };
    counter.load(Ordering::SeqCst) == u64::MAX
}

/// The I/O error at the root of a `Stopped`.
fn root_io(e: &Error) -> &std::io::Error {
    match e {
        Error::Stopped { cause } => root_io(cause),
        Error::Io { source, .. } => source,
        other => panic!("expected an I/O failure, got {other:?}"),
    }
}

/// One fault on the write in flight: it fails, the engine stops, a reopen keeps every
/// acknowledged entry and nothing of the failed batch in part.
fn fault_in_flight(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultyFileSystem::new();
    let engine = Engine::open_with(config(dir.path()), Arc::new(fs.clone())).unwrap();
    wait_for_open_io(fs.plan());
    let logs = [1u64, 2, 3];
    let mut acked = Acked::new();
    for k in 0..20 {
        let (b, items) = batch_for(&acked, &logs, 100 + k * 10);
        engine.write_blocking(&b).unwrap();
        ack(&mut acked, items);
    }
    arm(fs.plan(), fault, 0);
    let (b, in_flight) = batch_for(&acked, &logs, 3000);
    let err = engine
        .write_blocking(&b)
        .expect_err("the write in flight must fail");
    assert!(
        fired(fs.plan(), fault),
        "{fault:?} did not fire on the write path"
    );
    assert!(matches!(err, Error::Stopped { .. }), "{fault:?}: {err:?}");
    let io = root_io(&err);
    match fault {
        Fault::WriteEio | Fault::SyncEio => assert_eq!(io.raw_os_error(), Some(libc::EIO), "{io}"),
        Fault::NoSpace => assert_eq!(io.raw_os_error(), Some(libc::ENOSPC), "{io}"),
        Fault::ShortWrite => assert_eq!(io.kind(), std::io::ErrorKind::WriteZero, "{io}"),
    }
    // Fail-stop: nothing more is accepted, and nothing pretends to work.
    let (b, _) = batch_for(&acked, &logs, 10);
    assert!(matches!(
        engine.write_blocking(&b),
        Err(Error::Stopped { .. })
    ));
    let mut other = WriteBatch::new();
    other.put_meta(9, b"vote", b"1");
    assert!(matches!(
        engine.write_blocking(&other),
        Err(Error::Stopped { .. })
    ));
    assert!(matches!(
        engine.rotate_blocking(),
        Err(Error::Stopped { .. })
    ));
    assert!(matches!(engine.compact_now(), Err(Error::Stopped { .. })));
    // Reads of acknowledged data still work while stopped.
    check_acked(&engine, &acked);
    // The failed batch was staged in the index while its write and sync ran (session 8):
    // never published, so none of it is readable and no log's bounds moved past it.
    for (log, index, _) in &in_flight {
        assert!(
            matches!(engine.get(*log, *index), Err(Error::OutOfRange { .. })),
            "{fault:?}: unacknowledged entry {log}/{index} is readable"
        );
        assert_eq!(
            engine.bounds(*log).map(|b| b.next),
            Some(*index),
            "{fault:?}"
        );
    }
    assert!(matches!(engine.close(), Err(Error::Stopped { .. })));

    if fault == Fault::ShortWrite {
        // Half a record at the tail is a torn write: strict recovery refuses it.
        let mut strict = config(dir.path());
        strict.recovery_mode = RecoveryMode::Strict;
        let err = Engine::open(strict).expect_err("strict recovery accepts a torn tail");
        assert!(err.is_corruption(), "{err}");
    }
    let engine = Engine::open(config(dir.path())).unwrap();
    check_acked(&engine, &acked);
    let present = all_or_nothing(&engine, &in_flight);
    match fault {
        // Nothing (or half a record) reached the file: the batch is gone.
        Fault::WriteEio | Fault::NoSpace | Fault::ShortWrite => assert!(!present, "{fault:?}"),
        // The bytes reached the page cache; a reopen may see them, whole.
        Fault::SyncEio => {}
    }
    assert!(engine.meta(9, b"vote").is_none());
    // The reopened engine works.
    let (b, items) = batch_for(&acked, &logs, 50);
    if !present {
        engine.write_blocking(&b).unwrap();
        ack(&mut acked, items);
    }
    check_acked(&engine, &acked);
}

#[test]
fn failed_write_stops_the_engine() {
    fault_in_flight(Fault::WriteEio);
}

#[test]
fn full_disk_stops_the_engine() {
    fault_in_flight(Fault::NoSpace);
}

#[test]
fn short_write_stops_the_engine() {
    fault_in_flight(Fault::ShortWrite);
}

#[test]
fn failed_fdatasync_stops_the_engine() {
    fault_in_flight(Fault::SyncEio);
}

/// Faults aimed at a random write or sync of a busy engine (rotations, index files,
/// checkpoints, segment freeing): whichever I/O they hit, no write reports success after
/// the engine failed, the engine stops, and a reopen keeps everything acknowledged.
#[test]
fn faults_anywhere_never_lose_acknowledged_entries() {
    let seed = seed();
    eprintln!("faults_anywhere: seed={seed} (CHATLOG_TEST_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..24 {
        let fault = [
            Fault::WriteEio,
            Fault::NoSpace,
            Fault::ShortWrite,
            Fault::SyncEio,
        ][round % 4];
        let after = rng.random_range(0..60u64);
        let ctx = format!("seed={seed} round={round} fault={fault:?} after={after}");
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFileSystem::new();
        let mut cfg = config(dir.path());
        cfg.recycle_segments_max = 2;
        let engine = Engine::open_with(cfg.clone(), Arc::new(fs.clone())).unwrap();
        let logs = [1u64, 2, 3, 4];
        let mut acked = Acked::new();
        // The first failed batch: its error, its entries and its purges.
        type Failed = (Error, Vec<(u64, u64, Vec<u8>)>, Vec<(u64, u64)>);
        let mut failed: Option<Failed> = None;
        arm(fs.plan(), fault, after);
        for k in 0..300u64 {
            let (mut b, items) = batch_for(&acked, &logs, rng.random_range(10..20_000));
            let mut purges = Vec::new();
            if k % 10 == 9 {
                // Retention: frees segments, so checkpoints, deletes and recycling run.
                for &log in &logs {
                    if let Some(last) = acked.get(&log).and_then(|m| m.keys().next_back()) {
                        let point = last.saturating_sub(5).max(1);
                        b.purge_before(log, point);
                        purges.push((log, point));
                    }
                }
            }
            match engine.write_blocking(&b) {
                Ok(()) => {
                    assert!(
                        failed.is_none(),
                        "{ctx}: a write succeeded after one failed"
                    );
                    purge(&mut acked, &purges);
                    ack(&mut acked, items);
                }
                Err(e) => {
                    if let Some((first, ..)) = &failed {
                        assert!(
                            matches!(e, Error::Stopped { .. }),
                            "{ctx}: after {first}: {e:?}"
                        );
                    } else {
                        assert!(matches!(e, Error::Stopped { .. }), "{ctx}: {e:?}");
                        failed = Some((e, items, purges));
                    }
                    if k % 7 == 0 {
                        break;
                    }
                }
            }
        }
        if failed.is_none() && fired(fs.plan(), fault) {
            // The fault hit the segment being prepared: the next rotation must fail.
            let err = engine.rotate_blocking().expect_err(&ctx);
            assert!(matches!(err, Error::Stopped { .. }), "{ctx}: {err:?}");
            let (b, _) = batch_for(&acked, &logs, 10);
            assert!(
                matches!(engine.write_blocking(&b), Err(Error::Stopped { .. })),
                "{ctx}"
            );
        }
        assert!(fired(fs.plan(), fault), "{ctx}: the fault never fired");
        let _ = engine.close();
        let engine = Engine::open(cfg).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
        if let Some((_, items, purges)) = &failed
            && all_or_nothing(&engine, items)
        {
            // The failed batch reached the disk after all (a failed fdatasync): whole,
            // purges included.
            purge(&mut acked, purges);
        }
        for (log, entries) in &acked {
            let b = engine
                .bounds(*log)
                .unwrap_or_else(|| panic!("{ctx}: log {log} lost"));
            for (index, want) in entries {
                let got = engine
                    .get(*log, *index)
                    .unwrap_or_else(|e| panic!("{ctx}: {log}/{index}: {e}"));
                assert_eq!(got[..], want[..], "{ctx}: {log}/{index}");
            }
            for index in b.first..b.next {
                engine
                    .get(*log, index)
                    .unwrap_or_else(|e| panic!("{ctx}: not dense at {log}/{index}: {e}"));
            }
        }
    }
}

/// Drops acknowledged entries below each `(log, point)`.
fn purge(acked: &mut Acked, purges: &[(u64, u64)]) {
    for &(log, point) in purges {
        if let Some(m) = acked.get_mut(&log) {
            *m = m.split_off(&point);
        }
    }
}

/// A bit flipped on its way from the disk is a corruption error that stops the log; other
/// logs keep working; a reopen on a healthy disk reads the data fine.
#[test]
fn bit_flip_on_read_stops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    // Logs 7 and 8 are read first, to load the index files of both segments: then a get
    // of the others reads an index block, a record header and a record body, in that order.
    let logs = [1u64, 2, 3, 4, 5, 6, 7, 8];
    let mut acked = Acked::new();
    {
        let engine = Engine::open(config(dir.path())).unwrap();
        // Two segments: the first sealed (read through its index file), then an active one.
        for k in 0..30 {
            for log in logs {
                let (b, items) = batch_for(&acked, &[log], 200 + k);
                engine.write_blocking(&b).unwrap();
                ack(&mut acked, items);
            }
            if k == 14 {
                engine.rotate_blocking().unwrap();
            }
        }
        // Leave an empty active segment, so opening replays nothing and seals nothing:
        // every read after open is one the test makes.
        engine.rotate_blocking().unwrap();
        engine.close().unwrap();
    }
    let fs = FaultyFileSystem::new();
    let engine = Engine::open_with(config(dir.path()), Arc::new(fs.clone())).unwrap();
    assert_eq!(engine.get(7, 3).unwrap()[..], acked[&7][&3][..]);
    assert_eq!(engine.get(8, 20).unwrap()[..], acked[&8][&20][..]);
    // Flip the n-th read of one get: 0 the index block, 1 the record header, 2 its body.
    let cases = [
        (1u64, 3u64, 0u64),
        (2, 4, 1),
        (3, 5, 2),
        (4, 20, 0),
        (5, 21, 1),
        (6, 22, 2),
    ];
    for (log, index, after) in cases {
        fs.plan().flip_read_after.store(after, Ordering::SeqCst);
        let err = engine
            .get(log, index)
            .expect_err("a flipped read returned data");
        assert!(err.is_corruption(), "log {log} read {after}: {err:?}");
        assert!(
            matches!(&err, Error::Corruption { file, .. } if file.starts_with(dir.path())),
            "the error names the file: {err:?}"
        );
        assert_eq!(
            fs.plan().flip_read_after.load(Ordering::SeqCst),
            u64::MAX,
            "the flip fired"
        );
        // The log is stopped: reads and writes refuse with the cause.
        let again = engine
            .get(log, index)
            .expect_err("a stopped log served a read");
        assert!(
            matches!(again, Error::LogFailed { log: l, .. } if l == log),
            "{again:?}"
        );
        assert!(again.is_corruption());
        assert!(matches!(engine.get(log, 1), Err(Error::LogFailed { .. })));
        let (b, _) = batch_for(&acked, &[log], 10);
        assert!(matches!(
            engine.write_blocking(&b),
            Err(Error::LogFailed { .. })
        ));
    }
    // Other logs are unaffected; a healthy reopen reads everything.
    let mut spare = WriteBatch::new();
    spare.append(9, 1, b"another log still works");
    engine.write_blocking(&spare).unwrap();
    assert_eq!(&engine.get(9, 1).unwrap()[..], b"another log still works");
    assert_eq!(engine.get(7, 30).unwrap()[..], acked[&7][&30][..]);
    engine.close().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    check_acked(&engine, &acked);
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// A record of a segment file, parsed independently of the engine's reader.
#[derive(Debug)]
struct Record {
    offset: u64,
    header: RecordHeader,
    /// (log, index) of every entry it holds.
    entries: Vec<(u64, u64)>,
}

/// Walks a segment file's records from the first to the first invalid one.
fn records(path: &Path) -> Vec<Record> {
    let bytes = std::fs::read(path).unwrap();
    let salt = SegmentHeader::decode(&bytes).unwrap().salt;
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_BYTES;
    while let Some(header) = bytes.get(at..).and_then(|b| RecordHeader::decode(salt, b)) {
        let start = at + RECORD_HEADER_BYTES;
        let body = Bytes::copy_from_slice(&bytes[start..start + header.body_len as usize]);
        let raw = decode_body(&header, body).expect("a synced record checks out");
        let mut entries = Vec::new();
        if header.kind == chatlog_storage::format::RECORD_KIND_BATCH {
            let body = BatchBody::parse(raw).unwrap();
            for k in 0..body.op_count() {
                let op = body.op(k);
                if op.kind == OpKind::Append {
                    entries.extend((0..op.count as u64).map(|i| (op.log_id, op.index + i)));
                }
            }
        }
        out.push(Record {
            offset: at as u64,
            header,
            entries,
        });
        at += header.record_bytes();
    }
    out
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

/// Writes 40 two-log batches into one segment and closes, leaving it active (unsealed).
fn forty_batches(dir: &Path, rotate_after: Option<u64>) -> Acked {
    let engine = Engine::open(config(dir)).unwrap();
    let mut acked = Acked::new();
    for k in 0..40 {
        let (b, items) = batch_for(&acked, &[1, 2], 500);
        engine.write_blocking(&b).unwrap();
        ack(&mut acked, items);
        if rotate_after == Some(k) {
            engine.rotate_blocking().unwrap();
        }
    }
    engine.close().unwrap();
    acked
}

fn assert_corruption_at(err: &Error, file: &Path, offset: u64) {
    match err {
        Error::Corruption {
            file: f, offset: o, ..
        } => {
            assert_eq!((f.as_path(), *o), (file, offset), "{err}");
        }
        Error::LogFailed { cause, .. } | Error::Stopped { cause } => {
            assert_corruption_at(cause, file, offset)
        }
        other => panic!(
            "expected corruption in {} at {offset}, got {other:?}",
            file.display()
        ),
    }
}

/// Damage inside a sealed segment that the checkpoint covers is found when the entry is
/// read: an error naming the segment and the record's offset; the log stops there.
#[test]
fn flipped_byte_in_sealed_segment_is_reported_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let acked = forty_batches(dir.path(), Some(39));
    let seg = segment_path(dir.path(), 1);
    let recs = records(&seg);
    assert!(recs.len() >= 41, "40 batches and a seal: {}", recs.len());
    let victim = &recs[20];
    flip_byte(&seg, victim.offset + RECORD_HEADER_BYTES as u64 + 100);
    let engine = Engine::open(config(dir.path())).unwrap();
    let (log, index) = victim.entries[0];
    let err = engine.get(log, index).expect_err("damaged entry served");
    assert_corruption_at(&err, &seg, victim.offset);
    assert!(matches!(engine.get(log, 1), Err(Error::LogFailed { .. })));
    // The other log of the damaged record stops when it reads there too; entries of both
    // logs before the damage were never wrong.
    let other = if log == 1 { 2 } else { 1 };
    for index in 1..acked[&other].len() as u64 + 1 {
        match engine.get(other, index) {
            Ok(p) => assert_eq!(p[..], acked[&other][&index][..]),
            Err(e) => {
                assert!(
                    victim.entries.contains(&(other, index))
                        || matches!(e, Error::LogFailed { .. }),
                    "{e}"
                );
                assert!(e.is_corruption(), "{e}");
            }
        }
    }
}

/// Damage in the middle of the active segment (synced records follow it) is not a torn
/// tail: opening fails, naming the file and the record's offset.
#[test]
fn flipped_byte_in_active_segment_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    forty_batches(dir.path(), None);
    let seg = segment_path(dir.path(), 1);
    let recs = records(&seg);
    assert_eq!(recs.len(), 40);
    for (what, at) in [("body", RECORD_HEADER_BYTES as u64 + 7), ("header", 12)] {
        let victim = &recs[17];
        flip_byte(&seg, victim.offset + at);
        for mode in [RecoveryMode::TolerateTornTail, RecoveryMode::Strict] {
            let mut cfg = config(dir.path());
            cfg.recovery_mode = mode;
            let err = Engine::open(cfg).expect_err("opened over damaged synced data");
            assert_corruption_at(&err, &seg, victim.offset);
            assert!(err.is_corruption(), "{what} {mode:?}: {err}");
        }
        flip_byte(&seg, victim.offset + at);
    }
    // Undone, it opens with everything.
    let engine = Engine::open(config(dir.path())).unwrap();
    assert_eq!(engine.bounds(1).unwrap().next, 41);
}

/// Damage in a sealed segment that no checkpoint covers (the checkpoint is gone, so open
/// replays everything) fails the open, naming file and offset.
#[test]
fn flipped_byte_in_replayed_sealed_segment_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    forty_batches(dir.path(), Some(29));
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
    let seg = segment_path(dir.path(), 1);
    let victim_offset = records(&seg)[10].offset;
    flip_byte(&seg, victim_offset + RECORD_HEADER_BYTES as u64 + 3);
    let err = Engine::open(config(dir.path())).expect_err("opened over damaged synced data");
    assert_corruption_at(&err, &seg, victim_offset);
}

/// A flipped byte in the checkpoint fails the open with an error naming the checkpoint.
#[test]
fn flipped_byte_in_checkpoint_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    forty_batches(dir.path(), Some(29));
    let cp = dir.path().join("checkpoint");
    let len = std::fs::metadata(&cp).unwrap().len();
    for at in [3, 20, len / 2, len - 1] {
        flip_byte(&cp, at);
        let err = Engine::open(config(dir.path())).expect_err("opened over a damaged checkpoint");
        assert!(
            matches!(&err, Error::Corruption { file, .. } if *file == cp),
            "{err:?}"
        );
        flip_byte(&cp, at);
    }
    Engine::open(config(dir.path())).unwrap();
}

/// The last record torn (its body zeroed in part) is a write that never finished: it is
/// cut and the engine opens with everything before it; strict recovery refuses. Garbage
/// after the last record is no record: both modes open. A file cut inside its last record
/// is shorter than the engine ever leaves a segment (created and recycled at full length,
/// synced before use): damage that may have taken acknowledged records, refused in both
/// modes, naming the file and the record (issue 9).
#[test]
fn torn_tail_is_cut_and_garbage_after_it_ignored() {
    let seed = seed();
    eprintln!("torn_tail: seed={seed} (CHATLOG_TEST_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    for damage in [
        "zero part of the body",
        "cut the file inside it",
        "garbage after the tail",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let acked = forty_batches(dir.path(), None);
        let seg = segment_path(dir.path(), 1);
        let recs = records(&seg);
        let last = recs.last().unwrap();
        let body_at = last.offset + RECORD_HEADER_BYTES as u64;
        let end = last.offset + last.header.record_bytes() as u64;
        let mut bytes = std::fs::read(&seg).unwrap();
        match damage {
            "zero part of the body" => {
                let from = body_at + rng.random_range(0..last.header.body_len as u64 / 2);
                bytes[from as usize..end as usize].fill(0);
            }
            "cut the file inside it" => bytes.truncate(rng.random_range(body_at..end - 1) as usize),
            _ => {
                let n = rng.random_range(1..5000usize);
                for b in &mut bytes[end as usize..end as usize + n] {
                    *b = rng.random();
                }
            }
        }
        std::fs::write(&seg, &bytes).unwrap();
        if damage == "cut the file inside it" {
            for mode in [RecoveryMode::Strict, RecoveryMode::TolerateTornTail] {
                let mut c = config(dir.path());
                c.recovery_mode = mode;
                match Engine::open(c) {
                    Err(e) => assert_corruption_at(&e, &seg, last.offset),
                    Ok(_) => panic!("seed={seed}: a truncated segment opened ({mode:?})"),
                }
            }
            continue;
        }
        let torn = damage != "garbage after the tail";
        let mut strict = config(dir.path());
        strict.recovery_mode = RecoveryMode::Strict;
        match Engine::open(strict) {
            Err(e) if torn => assert_corruption_at(&e, &seg, last.offset),
            Ok(e) if !torn => drop(e),
            other => panic!("seed={seed} {damage}: strict open gave {other:?}"),
        }
        // Twice: the second open recovers what the first recovered.
        for _ in 0..2 {
            let engine = Engine::open(config(dir.path()))
                .unwrap_or_else(|e| panic!("seed={seed} {damage}: {e}"));
            for log in [1u64, 2] {
                let want_next = if torn { 40 } else { 41 };
                assert_eq!(
                    engine.bounds(log).unwrap().next,
                    want_next,
                    "seed={seed} {damage}"
                );
                for index in 1..want_next {
                    assert_eq!(
                        engine.get(log, index).unwrap()[..],
                        acked[&log][&index][..],
                        "seed={seed} {damage}"
                    );
                }
            }
            // The cut tail is sealed over; new appends go on from the recovered end.
            let mut b = WriteBatch::new();
            let next = engine.bounds(1).unwrap().next;
            b.append(1, next, b"after recovery");
            engine.write_blocking(&b).unwrap();
            let mut b = WriteBatch::new();
            b.truncate_after(1, next - 1);
            engine.write_blocking(&b).unwrap();
            engine.close().unwrap();
        }
    }
}

/// Recycling writes the new header into the recycle file, syncs, then renames it. A crash
/// between the header and the rename leaves a recycle file that already names the next
/// segment: opening must still work and reuse it. A segment file whose header names
/// another segment (a misnamed file: not something the engine produces) is refused.
#[test]
fn interrupted_recycling_leaves_an_openable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.recycle_segments_max = 4;
    let mut acked = Acked::new();
    {
        let engine = Engine::open(cfg.clone()).unwrap();
        // Fill several segments, then purge them all and rotate so they are freed.
        for _ in 0..60 {
            let (b, items) = batch_for(&acked, &[1], 20_000);
            engine.write_blocking(&b).unwrap();
            ack(&mut acked, items);
        }
        let mut b = WriteBatch::new();
        b.purge_before(1, 55);
        engine.write_blocking(&b).unwrap();
        acked.get_mut(&1).unwrap().retain(|i, _| *i >= 55);
        engine.rotate_blocking().unwrap();
        engine.rotate_blocking().unwrap();
        engine.close().unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let recycled = names
        .iter()
        .find(|n| n.starts_with("recycle-"))
        .expect("a recycled segment file");
    let last_id = names
        .iter()
        .filter_map(|n| n.strip_suffix(".seg"))
        .map(|s| u64::from_str_radix(s, 16).unwrap())
        .max()
        .unwrap();
    // The crash: the recycle file got the next segment's header, the rename never ran.
    let header = chatlog_storage::format::SegmentHeader {
        segment_id: last_id + 1,
        salt: 7,
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(recycled))
            .unwrap();
        f.write_all_at(&header.encode(), 0).unwrap();
        f.sync_all().unwrap();
    }
    {
        let engine = Engine::open(cfg.clone())
            .unwrap_or_else(|e| panic!("open after an interrupted recycle: {e}"));
        check_acked_from(&engine, &acked);
        engine.close().unwrap();
    }
    // A misnamed segment: copy a sealed segment's bytes under another segment's name.
    let mut ids: Vec<u64> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".seg")
                .map(|s| u64::from_str_radix(s, 16).unwrap())
        })
        .collect();
    ids.sort_unstable();
    let (first, last) = (ids[0], *ids.last().unwrap());
    std::fs::copy(
        segment_path(dir.path(), first),
        segment_path(dir.path(), last),
    )
    .unwrap();
    let err = Engine::open(cfg).expect_err("a misnamed segment must be refused");
    assert!(err.is_corruption(), "{err}");
}

/// Like `check_acked`, for logs whose head was purged.
fn check_acked_from(engine: &Engine, acked: &Acked) {
    for (log, entries) in acked {
        for (index, want) in entries {
            let got = engine
                .get(*log, *index)
                .unwrap_or_else(|e| panic!("{log}/{index}: {e}"));
            assert_eq!(got[..], want[..], "{log}/{index}");
        }
    }
}
