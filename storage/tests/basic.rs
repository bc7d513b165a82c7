//! Basic behaviour of the engine through its public API, on the real file system.

use chatlog_storage::{Config, Engine, Error, IoMode, WriteBatch};

fn small(dir: &std::path::Path) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = 1 << 20;
    c.compaction_interval_ms = 3_600_000;
    c
}

#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [IoMode::Syscall, IoMode::Auto] {
        let sub = dir.path().join(format!("{mode:?}"));
        let mut cfg = small(&sub);
        cfg.io_mode = mode;
        {
            let e = Engine::open(cfg.clone()).unwrap();
            for round in 0..50u64 {
                let mut b = WriteBatch::new();
                for log in 0..20u64 {
                    b.append(
                        log,
                        round + 1,
                        format!("log {log} entry {}", round + 1).as_bytes(),
                    );
                }
                e.write_blocking(&b).unwrap();
            }
            let mut b = WriteBatch::new();
            b.put_meta(3, b"vote", b"term 7");
            e.write_blocking(&b).unwrap();
            assert_eq!(&e.get(5, 17).unwrap()[..], b"log 5 entry 17");
            e.close().unwrap();
        }
        let e = Engine::open(cfg.clone()).unwrap();
        for log in 0..20u64 {
            let b = e.bounds(log).unwrap();
            assert_eq!((b.first, b.next), (1, 51));
            let v = e.read(log, 1..51, usize::MAX).unwrap();
            assert_eq!(v.len(), 50);
            for (k, p) in v.iter().enumerate() {
                assert_eq!(&p[..], format!("log {log} entry {}", k + 1).as_bytes());
            }
        }
        assert_eq!(e.meta(3, b"vote").as_deref(), Some(&b"term 7"[..]));
        let mut bad = WriteBatch::new();
        bad.append(1, 99, b"gap");
        assert!(matches!(
            e.write_blocking(&bad),
            Err(Error::InvalidWrite { log: 1, .. })
        ));
    }
}

/// Compaction gathers the live entries of a segment into rewrite batches; those batches
/// must obey the engine's own write-batch limit, which small segments make smaller than
/// compaction's 1 MiB batch. Compressed records let a 256 KiB segment hold far more raw
/// bytes than that limit.
#[test]
fn compaction_respects_write_batch_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small(dir.path());
    cfg.segment_bytes = 256 << 10;
    cfg.compression_bytes_min = 1024;
    cfg.compaction_bytes_per_sec = 1 << 30;
    let e = Engine::open(cfg.clone()).unwrap();
    let big = |i: u64| {
        format!("compressible entry {i} ")
            .repeat(8_000)
            .into_bytes()
    }; // ~180 KiB raw
    for i in 1..=20u64 {
        let mut b = WriteBatch::new();
        b.append(1, i, &big(i));
        b.append_many(2, 2 * i - 1, [b"dead 1".as_slice(), b"dead 2"]);
        e.write_blocking(&b).unwrap();
    }
    assert!(
        e.write_batch_bytes_max() < 20 * big(1).len(),
        "the live raw bytes exceed one batch"
    );
    let mut b = WriteBatch::new();
    b.purge_before(2, 41);
    e.write_blocking(&b).unwrap();
    e.rotate_blocking().unwrap();
    let report = e
        .compact_now()
        .expect("compaction of a mostly-dead segment");
    assert_eq!(report.segments_rewritten, 1, "{report:?}");
    assert_eq!(report.entries_rewritten, 20, "{report:?}");
    for i in 1..=20u64 {
        assert_eq!(e.get(1, i).unwrap()[..], big(i)[..]);
    }
    e.close().unwrap();
    let e = Engine::open(cfg).unwrap();
    for i in 1..=20u64 {
        assert_eq!(e.get(1, i).unwrap()[..], big(i)[..]);
    }
}

/// A log's indexes are `u64`: an append whose last index would not fit (the log's next
/// index would pass `u64::MAX`) must be refused as an invalid write, and the engine must
/// keep working, never panic or wrap around.
#[test]
fn append_past_the_last_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(dir.path());
    let e = Engine::open(cfg.clone()).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, u64::MAX - 2, b"fits");
    b.append(1, u64::MAX - 1, b"fits too");
    e.write_blocking(&b).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, u64::MAX, b"next index would overflow");
    assert!(matches!(
        e.write_blocking(&b),
        Err(Error::InvalidWrite { log: 1, .. })
    ));
    let mut b = WriteBatch::new();
    b.append(2, u64::MAX, b"next index would overflow");
    assert!(matches!(
        e.write_blocking(&b),
        Err(Error::InvalidWrite { log: 2, .. })
    ));
    let mut b = WriteBatch::new();
    b.append(3, 1, b"the engine still works");
    e.write_blocking(&b).unwrap();
    let bounds = e.bounds(1).unwrap();
    assert_eq!((bounds.first, bounds.next), (u64::MAX - 2, u64::MAX));
    e.close().unwrap();
    let e = Engine::open(cfg).unwrap();
    assert_eq!(&e.get(1, u64::MAX - 1).unwrap()[..], b"fits too");
    assert_eq!(&e.get(3, 1).unwrap()[..], b"the engine still works");
}

/// `segment_bytes` may change between runs. An empty segment left by the last run (it was
/// prepared, or the active one after a rotation) was sized by the old setting; appending
/// past its end under a larger setting must still give readable entries.
#[test]
fn reopen_with_larger_segments_keeps_entries_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small(dir.path());
    cfg.segment_bytes = 256 << 10;
    let e = Engine::open(cfg.clone()).unwrap();
    let mut b = WriteBatch::new();
    b.append(1, 1, b"first run");
    e.write_blocking(&b).unwrap();
    // Leave an empty active segment of 256 KiB behind.
    e.rotate_blocking().unwrap();
    e.close().unwrap();

    cfg.segment_bytes = 1 << 20;
    let e = Engine::open(cfg.clone()).unwrap();
    let entry = vec![7u8; 10_000];
    for i in 2..=60u64 {
        let mut b = WriteBatch::new();
        b.append(1, i, &entry);
        e.write_blocking(&b).unwrap();
    }
    for i in 2..=60u64 {
        let got = e.get(1, i).unwrap_or_else(|err| panic!("entry {i}: {err}"));
        assert_eq!(got[..], entry[..], "entry {i}");
    }
    e.close().unwrap();
    let e = Engine::open(cfg).unwrap();
    assert_eq!(&e.get(1, 1).unwrap()[..], b"first run");
    for i in 2..=60u64 {
        let got = e
            .get(1, i)
            .unwrap_or_else(|err| panic!("entry {i} after reopening: {err}"));
        assert_eq!(got[..], entry[..], "entry {i} after reopening");
    }
}
