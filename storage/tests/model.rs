//! Model test: random sequences of multi-log write batches (appends, truncates, purges,
//! redactions, metadata puts and deletes, some of them invalid or too large), reopens,
//! compactions and rotations, run against the engine and against a plain in-memory model
//! (a `BTreeMap` per log). After every step the engine's bounds, every entry, the metadata
//! and the set of known logs must equal the model's; a refused batch must change nothing.
//!
//! Segments are small (256 KiB – 1 MiB) and some payloads large, so rotation, seals,
//! checkpoints, segment freeing and compaction all happen; the test asserts at the end
//! that they did.
//!
//! Seeded: `CHATLOG_TEST_SEED=<n>` (or proptest's `PROPTEST_RNG_SEED`) replays a run;
//! `PROPTEST_CASES=<n>` sets the number of cases and `CHATLOG_MODEL_STEPS=<n>` the longest
//! sequence (for a soak). The seed is printed at the start and in
//! the failure message, with the minimal failing sequence of steps.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use chatlog_storage::{Config, Engine, Error, IoMode, WriteBatch};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};

/// Logs the steps touch: small and huge ids, so nothing assumes dense log ids.
const LOGS: [u64; 5] = [1, 2, 3, 1 << 40, u64::MAX];
/// Metadata keys the steps use; every one is checked for presence and absence.
const META_KEYS: [&[u8]; 4] = [b"vote", b"committed", b"applied", &[b'k'; 255]];
const DEFAULT_CASES: u32 = 64;

/// Payload shapes: large ones fill small segments quickly, compressible ones take the LZ4
/// path (compression starts at 1 KiB in this test's configuration).
#[derive(Debug, Clone, Copy)]
enum Size {
    Small(u8),
    Medium(u16),
    Large(u16),
    Compressible(u16),
}

impl Size {
    fn len(self) -> usize {
        match self {
            Size::Small(n) => n as usize,
            Size::Medium(n) => 200 + n as usize % 4_000,
            Size::Large(n) => 20_000 + n as usize % 40_000,
            Size::Compressible(n) => 1_000 + n as usize % 30_000,
        }
    }
}

fn payload(nonce: u32, log: u64, index: u64, size: Size) -> Vec<u8> {
    let len = size.len();
    if let Size::Compressible(_) = size {
        let pattern = format!("log {log} index {index} nonce {nonce}; ");
        return pattern.bytes().cycle().take(len).collect();
    }
    let mut state =
        (nonce as u64) ^ log.rotate_left(17) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One operation of a write batch. Indexes are relative to the model's state when the step
/// runs, so shrinking keeps the operations meaningful.
#[derive(Debug, Clone)]
enum Op {
    /// Appends `count` entries continuing the log (at `start` if it was never written);
    /// `gap > 0` appends past the end instead, which must be refused.
    Append {
        log: usize,
        count: u8,
        size: Size,
        nonce: u32,
        start: u8,
        gap: u8,
    },
    /// `truncate_after(next - 1 - back)`: refused when that reaches below the first index
    /// of a non-empty log (an empty one restarts there: "reset log start").
    TruncateAfter {
        log: usize,
        back: u8,
    },
    /// `purge_before(first + ahead)`, possibly past the end.
    PurgeBefore {
        log: usize,
        ahead: u8,
    },
    /// `redact(first + pos)`: refused when outside the log.
    Redact {
        log: usize,
        pos: u8,
        size: Size,
        nonce: u32,
    },
    PutMeta {
        log: usize,
        key: usize,
        len: u16,
        nonce: u32,
    },
    DeleteMeta {
        log: usize,
        key: usize,
    },
    /// A metadata key of zero bytes: refused.
    EmptyMetaKey {
        log: usize,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Write(Vec<Op>),
    Reopen,
    Compact,
    Rotate,
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![
        6 => any::<u8>().prop_map(Size::Small),
        3 => any::<u16>().prop_map(Size::Medium),
        2 => any::<u16>().prop_map(Size::Large),
        1 => any::<u16>().prop_map(Size::Compressible),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let log = 0..LOGS.len();
    prop_oneof![
        10 => (log.clone(), 1..8u8, size(), any::<u32>(), any::<u8>(), prop_oneof![9 => Just(0u8), 1 => 1..4u8])
            .prop_map(|(log, count, size, nonce, start, gap)| Op::Append { log, count, size, nonce, start, gap }),
        2 => (log.clone(), 0..24u8).prop_map(|(log, back)| Op::TruncateAfter { log, back }),
        2 => (log.clone(), 0..24u8).prop_map(|(log, ahead)| Op::PurgeBefore { log, ahead }),
        2 => (log.clone(), 0..24u8, size(), any::<u32>())
            .prop_map(|(log, pos, size, nonce)| Op::Redact { log, pos, size, nonce }),
        1 => (log.clone(), 0..META_KEYS.len(), 0..1_000u16, any::<u32>())
            .prop_map(|(log, key, len, nonce)| Op::PutMeta { log, key, len, nonce }),
        1 => (log.clone(), 0..META_KEYS.len()).prop_map(|(log, key)| Op::DeleteMeta { log, key }),
        1 => log.prop_map(|log| Op::EmptyMetaKey { log }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => prop::collection::vec(op(), 1..5).prop_map(Step::Write),
        2 => Just(Step::Reopen),
        2 => Just(Step::Compact),
        1 => Just(Step::Rotate),
    ]
}

/// The model of one log.
#[derive(Debug, Clone, Default, PartialEq)]
struct LogModel {
    /// Some operation was applied to the log (the engine then reports bounds for it).
    known: bool,
    /// An entry operation fixed where the log lives (before that, any first append goes).
    anchored: bool,
    first: u64,
    next: u64,
    entries: BTreeMap<u64, Vec<u8>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

type Model = BTreeMap<u64, LogModel>;

/// A batch op resolved against the model: what is sent to the engine.
#[derive(Debug, Clone)]
enum Resolved {
    Append(u64, u64, Vec<Vec<u8>>),
    TruncateAfter(u64, u64),
    PurgeBefore(u64, u64),
    Redact(u64, u64, Vec<u8>),
    PutMeta(u64, Vec<u8>, Vec<u8>),
    DeleteMeta(u64, Vec<u8>),
}

/// Applies one resolved op to the model the way the engine documents it; `Err` if the
/// engine must refuse it.
fn apply(model: &mut Model, op: &Resolved) -> Result<(), ()> {
    match op {
        Resolved::Append(log, index, payloads) => {
            let l = model.get_mut(log).expect("universe log");
            if l.anchored && *index != l.next {
                return Err(());
            }
            if !l.anchored {
                l.first = *index;
                l.anchored = true;
            }
            for (k, p) in payloads.iter().enumerate() {
                l.entries.insert(index + k as u64, p.clone());
            }
            l.next = index + payloads.len() as u64;
            l.known = true;
        }
        Resolved::TruncateAfter(log, index) => {
            let l = model.get_mut(log).expect("universe log");
            let keep_next = index.saturating_add(1);
            if !l.anchored {
                l.first = keep_next;
                l.next = keep_next;
                l.anchored = true;
            } else if keep_next < l.first && l.first == l.next {
                // "Reset log start": an empty log continues lower.
                l.first = keep_next;
                l.next = keep_next;
            } else if keep_next < l.first {
                return Err(());
            } else if keep_next < l.next {
                l.entries.split_off(&keep_next);
                l.next = keep_next;
            }
            l.known = true;
        }
        Resolved::PurgeBefore(log, index) => {
            let l = model.get_mut(log).expect("universe log");
            if !l.anchored {
                l.first = *index;
                l.next = *index;
                l.anchored = true;
            } else if *index > l.first {
                l.entries = l.entries.split_off(index);
                l.first = *index;
                l.next = l.next.max(*index);
            }
            l.known = true;
        }
        Resolved::Redact(log, index, p) => {
            let l = model.get_mut(log).expect("universe log");
            if !(l.first..l.next).contains(index) {
                return Err(());
            }
            l.entries.insert(*index, p.clone());
            l.known = true;
        }
        Resolved::PutMeta(log, k, v) => {
            let l = model.get_mut(log).expect("universe log");
            if k.is_empty() {
                return Err(());
            }
            l.meta.insert(k.clone(), v.clone());
            l.known = true;
        }
        Resolved::DeleteMeta(log, k) => {
            let l = model.get_mut(log).expect("universe log");
            if k.is_empty() {
                return Err(());
            }
            l.meta.remove(k);
            l.known = true;
        }
    }
    Ok(())
}

/// Resolves an op against the scratch model (which already holds the batch's earlier ops).
fn resolve(model: &Model, op: &Op) -> Resolved {
    let l = |i: usize| (LOGS[i], &model[&LOGS[i]]);
    match *op {
        Op::Append {
            log,
            count,
            size,
            nonce,
            start,
            gap,
        } => {
            let (log, m) = l(log);
            let index = if m.anchored {
                m.next + gap as u64
            } else {
                [1, 0, 5, 1_000, 1 << 33][start as usize % 5]
            };
            let payloads = (0..count as u64)
                .map(|k| payload(nonce, log, index + k, size))
                .collect();
            Resolved::Append(log, index, payloads)
        }
        Op::TruncateAfter { log, back } => {
            let (log, m) = l(log);
            Resolved::TruncateAfter(log, m.next.saturating_sub(1).saturating_sub(back as u64))
        }
        Op::PurgeBefore { log, ahead } => {
            let (log, m) = l(log);
            Resolved::PurgeBefore(log, m.first + ahead as u64)
        }
        Op::Redact {
            log,
            pos,
            size,
            nonce,
        } => {
            let (log, m) = l(log);
            let index = m.first + pos as u64;
            Resolved::Redact(log, index, payload(nonce, log, index, size))
        }
        Op::PutMeta {
            log,
            key,
            len,
            nonce,
        } => {
            let (log, _) = l(log);
            let value = payload(nonce, log, key as u64, Size::Small(0))
                .into_iter()
                .chain((0..len).map(|i| (i as u32 ^ nonce) as u8));
            Resolved::PutMeta(log, META_KEYS[key].to_vec(), value.collect())
        }
        Op::DeleteMeta { log, key } => Resolved::DeleteMeta(LOGS[log], META_KEYS[key].to_vec()),
        Op::EmptyMetaKey { log } => Resolved::PutMeta(LOGS[log], Vec::new(), b"x".to_vec()),
    }
}

fn add_to_batch(batch: &mut WriteBatch, op: &Resolved) {
    match op {
        Resolved::Append(log, index, payloads) => batch.append_many(*log, *index, payloads),
        Resolved::TruncateAfter(log, index) => batch.truncate_after(*log, *index),
        Resolved::PurgeBefore(log, index) => batch.purge_before(*log, *index),
        Resolved::Redact(log, index, p) => batch.redact(*log, *index, p),
        Resolved::PutMeta(log, k, v) => batch.put_meta(*log, k, v),
        Resolved::DeleteMeta(log, k) => batch.delete_meta(*log, k),
    }
}

fn log_of(op: &Resolved) -> u64 {
    match op {
        Resolved::Append(log, ..)
        | Resolved::TruncateAfter(log, _)
        | Resolved::PurgeBefore(log, _)
        | Resolved::Redact(log, ..)
        | Resolved::PutMeta(log, ..)
        | Resolved::DeleteMeta(log, _) => *log,
    }
}

/// The engine's whole visible state equals the model's.
fn check_engine_matches_model(engine: &Engine, model: &Model) -> Result<(), TestCaseError> {
    let known: Vec<u64> = model
        .iter()
        .filter(|(_, l)| l.known)
        .map(|(id, _)| *id)
        .collect();
    prop_assert_eq!(engine.logs(), known, "known logs differ");
    for (&log, m) in model {
        let bounds = engine.bounds(log);
        if !m.known {
            prop_assert!(
                bounds.is_none(),
                "log {} unknown to the model has bounds {:?}",
                log,
                bounds
            );
            continue;
        }
        let bounds =
            bounds.ok_or_else(|| TestCaseError::fail(format!("log {log} has no bounds")))?;
        prop_assert_eq!(
            (bounds.first, bounds.next),
            (m.first, m.next),
            "bounds of log {}",
            log
        );
        let mut index = m.first;
        while index < m.next {
            let got = engine
                .read(log, index..m.next, 256 << 10)
                .map_err(|e| TestCaseError::fail(format!("read log {log} from {index}: {e}")))?;
            prop_assert!(
                !got.is_empty(),
                "read of log {} from {} returned nothing",
                log,
                index
            );
            for p in got {
                let want = &m.entries[&index];
                prop_assert!(
                    p[..] == want[..],
                    "log {} entry {}: {} bytes read, model holds {} bytes",
                    log,
                    index,
                    p.len(),
                    want.len()
                );
                index += 1;
            }
        }
        for outside in [m.first.checked_sub(1), Some(m.next)].into_iter().flatten() {
            match engine.get(log, outside) {
                Err(Error::OutOfRange { .. }) => {}
                other => prop_assert!(
                    false,
                    "get({}, {}) outside the log gave {:?}",
                    log,
                    outside,
                    other
                ),
            }
        }
        for key in META_KEYS {
            prop_assert_eq!(
                engine.meta(log, key).map(|b| b.to_vec()),
                m.meta.get(key).cloned(),
                "meta of log {}",
                log
            );
        }
    }
    Ok(())
}

/// What happened across all cases, so the test can prove the heavy paths ran.
static SEGMENTS_FREED: AtomicU64 = AtomicU64::new(0);
static SEGMENTS_COMPACTED: AtomicU64 = AtomicU64::new(0);
static REOPENS_WITH_SEGMENTS: AtomicU64 = AtomicU64::new(0);
static REFUSED_BATCHES: AtomicU64 = AtomicU64::new(0);

fn config(dir: &std::path::Path, segment_bytes: u64, io_mode: IoMode) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = segment_bytes;
    c.io_mode = io_mode;
    c.compression_bytes_min = 1024;
    // Compaction runs only when a step asks for it, so every run is repeatable.
    c.compaction_interval_ms = 3_600_000;
    c.compaction_bytes_per_sec = 1 << 30;
    c
}

fn run_case(segment_bytes: u64, io_mode: IoMode, steps: &[Step]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let cfg = config(dir.path(), segment_bytes, io_mode);
    let fail = |what: &str, e: Error| TestCaseError::fail(format!("{what}: {e}"));
    let mut engine = Some(Engine::open(cfg.clone()).map_err(|e| fail("open", e))?);
    let mut model: Model = LOGS.iter().map(|l| (*l, LogModel::default())).collect();
    let record_freed = |e: &Engine| {
        SEGMENTS_FREED.fetch_add(e.stats().segments_freed, Ordering::Relaxed);
    };
    for (n, step) in steps.iter().enumerate() {
        let e = engine.as_ref().expect("open");
        match step {
            Step::Write(ops) => {
                let mut scratch = model.clone();
                let mut batch = WriteBatch::new();
                let mut refused_by: Option<u64> = None;
                for op in ops {
                    let r = resolve(&scratch, op);
                    add_to_batch(&mut batch, &r);
                    let empty_key = matches!(&r, Resolved::PutMeta(_, k, _) if k.is_empty());
                    if refused_by.is_none() && apply(&mut scratch, &r).is_err() {
                        refused_by = Some(log_of(&r));
                    }
                    // An empty key is refused while encoding, before any bounds check.
                    if empty_key {
                        refused_by = Some(log_of(&r));
                        break;
                    }
                }
                let too_large = batch.encoded_len() > e.write_batch_bytes_max();
                match (e.write_blocking(&batch), too_large, refused_by) {
                    (Err(Error::TooLarge { .. }), true, _) => {}
                    (Err(Error::InvalidWrite { log, .. }), false, Some(bad)) => {
                        prop_assert_eq!(log, bad, "step {}: refused for the wrong log", n);
                        REFUSED_BATCHES.fetch_add(1, Ordering::Relaxed);
                    }
                    (Ok(()), false, None) => model = scratch,
                    (got, too_large, refused_by) => prop_assert!(
                        false,
                        "step {}: write gave {:?}; expected too_large={} refused_by={:?}",
                        n,
                        got,
                        too_large,
                        refused_by
                    ),
                }
            }
            Step::Reopen => {
                let e = engine.take().expect("open");
                record_freed(&e);
                e.close().map_err(|e| fail("close", e))?;
                let e = Engine::open(cfg.clone()).map_err(|e| fail("reopen", e))?;
                if e.stats().segments > 1 {
                    REOPENS_WITH_SEGMENTS.fetch_add(1, Ordering::Relaxed);
                }
                engine = Some(e);
            }
            Step::Compact => {
                let report = e.compact_now().map_err(|e| fail("compact_now", e))?;
                SEGMENTS_COMPACTED.fetch_add(report.segments_rewritten as u64, Ordering::Relaxed);
            }
            Step::Rotate => e.rotate_blocking().map_err(|e| fail("rotate", e))?,
        }
        check_engine_matches_model(engine.as_ref().expect("open"), &model)
            .map_err(|err| TestCaseError::fail(format!("after step {n} ({step:?}): {err}")))?;
    }
    let e = engine.take().expect("open");
    record_freed(&e);
    e.close().map_err(|e| fail("close", e))?;
    // Whatever the steps did, a last reopen must see the same state.
    let e = Engine::open(cfg).map_err(|e| fail("final reopen", e))?;
    check_engine_matches_model(&e, &model)
        .map_err(|err| TestCaseError::fail(format!("after the final reopen: {err}")))?;
    e.close().map_err(|e| fail("close", e))
}

fn seed() -> u64 {
    ["CHATLOG_TEST_SEED", "PROPTEST_RNG_SEED"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .map(|v| v.parse().expect("the seed is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[test]
fn engine_matches_model() {
    let seed = seed();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .map_or(DEFAULT_CASES, |v| v.parse().expect("a count"));
    let steps_max: usize = std::env::var("CHATLOG_MODEL_STEPS")
        .ok()
        .map_or(70, |v| v.parse().expect("a count"));
    eprintln!(
        "model test: seed={seed} cases={cases} steps<{steps_max} \
         (CHATLOG_TEST_SEED, PROPTEST_CASES, CHATLOG_MODEL_STEPS)"
    );
    let config = ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        // Shrinking re-runs engine cases; bound it so a failure reports in minutes.
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (
        prop_oneof![Just(256u64 << 10), Just(512 << 10), Just(1 << 20)],
        prop_oneof![Just(IoMode::Syscall), Just(IoMode::Auto)],
        prop::collection::vec(step(), 10..steps_max),
    );
    let result = runner.run(&strategy, |(segment_bytes, io_mode, steps)| {
        run_case(segment_bytes, io_mode, &steps)
    });
    if let Err(e) = result {
        panic!("seed={seed}: {e}");
    }
    let (freed, compacted, reopens, refused) = (
        SEGMENTS_FREED.load(Ordering::Relaxed),
        SEGMENTS_COMPACTED.load(Ordering::Relaxed),
        REOPENS_WITH_SEGMENTS.load(Ordering::Relaxed),
        REFUSED_BATCHES.load(Ordering::Relaxed),
    );
    eprintln!(
        "model test: seed={seed}: {freed} segments freed, {compacted} compacted, \
         {reopens} reopens over several segments, {refused} batches refused"
    );
    // The workload must reach the paths it exists to test (with the default case count).
    if cases >= DEFAULT_CASES {
        assert!(freed > 0, "seed={seed}: no segment was ever freed");
        assert!(compacted > 0, "seed={seed}: no segment was ever compacted");
        assert!(reopens > 0, "seed={seed}: no reopen crossed a checkpoint");
        assert!(refused > 0, "seed={seed}: no invalid batch was tried");
    }
}
