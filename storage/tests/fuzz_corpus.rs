//! The `segment_open` fuzz target's check (`fuzz/segment_check.rs`) as a regular test, so
//! CI runs it without a nightly toolchain or libFuzzer:
//! - `corpus_inputs_pass`: every file in `fuzz/corpus/segment_open/`.
//! - `mutated_corpus_inputs_pass`: a few hundred seeded random mutations of those files
//!   (bit flips, byte writes, cuts, splices, duplicated ranges). `CHATLOG_TEST_SEED=<n>`
//!   replays a run, `CHATLOG_FUZZ_MUTATIONS=<n>` sets how many; the seed is printed.
//! - `engine_made_seeds_pass`: builds seed inputs with the engine itself (valid segments of
//!   every op kind, compressed and sealed ones, plus cut and flipped copies) and checks
//!   them; with `CHATLOG_WRITE_FUZZ_CORPUS=1` it also writes them into the corpus folder.
//!
//! A panic on any thread (the engine's included) fails the test: a hook records it.

mod common;

#[path = "../../fuzz/segment_check.rs"]
mod segment_check;

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use chatlog_storage::format::{
    RECORD_HEADER_BYTES, RecordHeader, SEGMENT_HEADER_BYTES, SegmentHeader,
};
use chatlog_storage::{Config, Engine, IoMode, WriteBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use segment_check::{Outcome, check};

const DEFAULT_MUTATIONS: u64 = 300;

/// Panics seen on any thread since the hook was installed.
static PANICS: AtomicU64 = AtomicU64::new(0);

fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// Runs the check on one input; a panic anywhere (this thread or an engine thread) fails
/// with the input's name.
fn run(name: &str, data: &[u8]) -> Outcome {
    watch_panics();
    let before = PANICS.load(Ordering::SeqCst);
    let outcome = std::panic::catch_unwind(|| check(data));
    let after = PANICS.load(Ordering::SeqCst);
    match outcome {
        Ok(o) if after == before => o,
        Ok(_) => panic!("{name}: an engine thread panicked (see above)"),
        Err(_) => panic!("{name}: the check failed (see the panic above)"),
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/segment_open")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .expect("fuzz/corpus/segment_open exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_inputs_pass() {
    let files = corpus();
    assert!(
        files.len() >= 24,
        "the corpus holds only {} files",
        files.len()
    );
    let mut opened = 0;
    let mut entries = 0;
    for (name, data) in &files {
        let o = run(name, data);
        opened += o.opened as usize;
        entries += o.entries;
    }
    eprintln!(
        "corpus: {} inputs, {opened} opened, {entries} entries read and checked",
        files.len()
    );
    // The corpus is meant to reach past the header checks: most seeds are valid.
    assert!(
        opened * 2 > files.len(),
        "only {opened} of {} corpus inputs opened",
        files.len()
    );
    assert!(entries > 100, "the corpus yields only {entries} entries");
}

fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, others: &[(String, Vec<u8>)]) -> String {
    let len = data.len().max(1);
    match rng.random_range(0..7) {
        0 => {
            let at = rng.random_range(0..len).min(data.len().saturating_sub(1));
            if let Some(b) = data.get_mut(at) {
                *b ^= 1 << rng.random_range(0..8);
            }
            format!("flip bit at {at}")
        }
        1 => {
            let at = rng.random_range(0..len).min(data.len().saturating_sub(1));
            let v: u8 = [0, 0xff, 1, 0x80, rng.random()][rng.random_range(0..5)];
            if let Some(b) = data.get_mut(at) {
                *b = v;
            }
            format!("set byte {at} to {v:#x}")
        }
        2 => {
            let at = rng.random_range(0..len);
            data.truncate(at);
            format!("cut at {at}")
        }
        3 => {
            let from = rng.random_range(0..len).min(data.len());
            let n = rng.random_range(0..64).min(data.len() - from);
            data.drain(from..from + n);
            format!("delete {n} bytes at {from}")
        }
        4 => {
            let from = rng.random_range(0..len).min(data.len());
            let n = rng.random_range(0..256).min(data.len() - from);
            let chunk: Vec<u8> = data[from..from + n].to_vec();
            let to = rng.random_range(0..len).min(data.len());
            data.splice(to..to, chunk);
            format!("duplicate {n} bytes from {from} at {to}")
        }
        5 => {
            let (name, other) = &others[rng.random_range(0..others.len())];
            let cut = rng.random_range(0..len).min(data.len());
            let from = rng.random_range(0..other.len().max(1)).min(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
            format!("splice {name} from {from} at {cut}")
        }
        _ => {
            // A u32/u64 field somewhere past byte 0 gets an interesting value.
            let at = rng.random_range(1..len.max(2)).min(data.len());
            let v: u64 =
                [0, 1, u32::MAX as u64, u64::MAX, 1 << 31, rng.random()][rng.random_range(0..6)];
            let bytes = v.to_le_bytes();
            let n = rng.random_range(4..=8).min(data.len() - at);
            data[at..at + n].copy_from_slice(&bytes[..n]);
            format!("write {v:#x} at {at}")
        }
    }
}

#[test]
fn mutated_corpus_inputs_pass() {
    let seed = common::seed();
    let count = std::env::var("CHATLOG_FUZZ_MUTATIONS")
        .ok()
        .map_or(DEFAULT_MUTATIONS, |v| v.parse().expect("a count"));
    eprintln!(
        "mutated corpus: seed={seed} mutations={count} (CHATLOG_TEST_SEED, CHATLOG_FUZZ_MUTATIONS)"
    );
    let files = corpus();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut opened, mut entries) = (0u64, 0u64);
    for m in 0..count {
        let (name, base) = &files[rng.random_range(0..files.len())];
        let mut data = base.clone();
        let mut what = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            what.push(mutate(&mut rng, &mut data, &files));
        }
        let label = format!("seed={seed} mutation {m} of {name}: {}", what.join(", "));
        let o = run(&label, &data);
        opened += o.opened as u64;
        entries += o.entries;
    }
    eprintln!(
        "mutated corpus: seed={seed}: {count} inputs, {opened} opened, {entries} entries checked"
    );
    assert!(
        count == 0 || opened > 0,
        "seed={seed}: no mutated input opened at all"
    );
}

// ---- Seeds made by the engine ------------------------------------------------------

fn engine_config(dir: &Path) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = 256 << 10;
    c.io_mode = IoMode::Syscall;
    c.compaction_interval_ms = 3_600_000;
    c.compression_bytes_min = 512;
    c
}

/// End of the last valid record of a segment image (to trim the preallocated zeros).
fn records_end(seg: &[u8]) -> usize {
    let salt = SegmentHeader::decode(seg).expect("engine-made header").salt;
    let mut at = SEGMENT_HEADER_BYTES;
    while let Some(h) = seg.get(at..).and_then(|b| RecordHeader::decode(salt, b)) {
        at += h.record_bytes();
    }
    at
}

/// Runs `ops` on a fresh engine and returns (segment 1 trimmed, checkpoint, idx of 1).
fn engine_files(ops: impl FnOnce(&Engine)) -> (Vec<u8>, Vec<u8>, Option<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(engine_config(dir.path())).unwrap();
    ops(&e);
    e.close().unwrap();
    let mut seg = std::fs::read(dir.path().join("0000000000000001.seg")).unwrap();
    seg.truncate(records_end(&seg) + 64);
    let cp = std::fs::read(dir.path().join("checkpoint")).unwrap();
    let idx = std::fs::read(dir.path().join("0000000000000001.idx")).ok();
    (seg, cp, idx)
}

fn write(e: &Engine, f: impl FnOnce(&mut WriteBatch)) {
    let mut b = WriteBatch::new();
    f(&mut b);
    e.write_blocking(&b).unwrap();
}

fn raw(seg: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(seg);
    v
}

/// What a seed's engine run does.
type Shape<'a> = dyn Fn(&Engine) + 'a;

/// Builds named seed inputs: valid images from the engine, then damaged copies.
fn engine_made_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let many_logs = |e: &Engine| {
        for k in 1..=30u64 {
            write(e, |b| {
                for log in 1..=5u64 {
                    b.append(log, k, format!("entry {k} of log {log}").as_bytes());
                }
            });
        }
    };
    let all_ops = |e: &Engine| {
        write(e, |b| {
            b.append_many(1, 1, (1..=20u64).map(|i| format!("one {i}")))
        });
        write(e, |b| {
            b.append_many(2, 100, (0..5u64).map(|i| format!("two {i}")))
        });
        write(e, |b| b.redact(1, 3, b"redacted"));
        write(e, |b| b.truncate_after(1, 15));
        write(e, |b| b.append(1, 16, b"after truncate"));
        write(e, |b| b.purge_before(2, 102));
        write(e, |b| b.put_meta(1, b"vote", b"term 3"));
        write(e, |b| b.put_meta(3, b"committed", &[7; 40]));
        write(e, |b| b.delete_meta(1, b"vote"));
        write(e, |b| {
            b.purge_before(4, 50);
            b.append(4, 50, b"continues after a purge");
        });
    };
    let compressed = |e: &Engine| {
        for k in 0..6u64 {
            write(e, |b| {
                b.append_many(
                    7,
                    1 + k * 40,
                    (0..40u64).map(|i| format!("compressible {} ", k * 40 + i).repeat(4)),
                )
            });
        }
    };
    let sealed = |e: &Engine| {
        many_logs(e);
        e.rotate_blocking().unwrap();
    };
    let shapes: [(&str, &Shape<'_>); 5] = [
        ("empty", &|_| {}),
        ("many-logs", &many_logs),
        ("all-ops", &all_ops),
        ("compressed", &compressed),
        ("sealed", &sealed),
    ];
    for (name, ops) in shapes {
        let (seg, cp, idx) = engine_files(ops);
        seeds.push((format!("{name}-raw"), raw(&seg)));
        seeds.push((format!("{name}-strict"), {
            let mut v = raw(&seg);
            v[0] = 0x80;
            v
        }));
        // With its checkpoint (and, once sealed, its index file).
        let mut files = vec![1u8];
        files.extend_from_slice(&(seg.len() as u32).to_le_bytes());
        files.extend_from_slice(&seg);
        files.extend_from_slice(&(cp.len() as u32).to_le_bytes());
        files.extend_from_slice(&cp);
        files.extend_from_slice(&idx.unwrap_or_default());
        seeds.push((format!("{name}-files"), files));
        let end = records_end(&seg);
        if end > SEGMENT_HEADER_BYTES {
            // The file cut inside its last record (damage: segments never shrink), the last
            // record torn; damage in the middle.
            let mut cut = raw(&seg);
            cut.truncate(1 + end - 10);
            seeds.push((format!("{name}-cut-tail"), cut));
            let mut flipped = raw(&seg);
            flipped[1 + end - 20] ^= 0x55;
            seeds.push((format!("{name}-flipped-tail"), flipped));
            let mut middle = raw(&seg);
            middle[1 + SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 4] ^= 0x01;
            seeds.push((format!("{name}-flipped-first-record"), middle));
        }
    }
    // Structured seeds (mode 2 and 3): records the harness checksums itself.
    seeds.push(("header-only".into(), vec![2u8]));
    let mut records = vec![3u8];
    // A raw batch body of one append op of log 1 at index 1 holding "hi".
    let mut body = vec![0u8; 8 + 40];
    body[0] = 1;
    let data_at = body.len() as u32;
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(b"hi");
    body[8] = 1; // append
    body[8 + 4] = 1; // count
    body[8 + 8] = 1; // log 1
    body[8 + 16] = 1; // index 1
    body[8 + 32..8 + 36].copy_from_slice(&data_at.to_le_bytes());
    body[8 + 36..8 + 40].copy_from_slice(&6u32.to_le_bytes());
    records.push(0);
    records.extend_from_slice(&(body.len() as u16).to_le_bytes());
    records.extend_from_slice(&body);
    seeds.push(("records-one-append".into(), records.clone()));
    // Op descriptions: append, redact, truncate, put_meta, rewrite; then a seal record.
    let ops: &[u8] = &[
        0, 1, 1, 3, 4, b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h', b'i', b'j', b'k',
        b'l', //
        b'm', b'n', b'o', b'p', //
        3, 1, 2, 0, 3, b'x', b'y', b'z', //
        1, 1, 3, 0, 0, //
        4, 2, 0, 0, 6, b'v', b'o', b't', b'e', b'1', b'2', //
        6, 1, 1, 1, 2, b'r', b'w', b'r', b'w',
    ];
    let mut with_ops = vec![3u8, 4, 0, 0];
    with_ops.extend_from_slice(ops);
    seeds.push(("records-ops".into(), with_ops.clone()));
    let mut compressed_ops = vec![3u8, 4 | 0x20, 0, 0];
    compressed_ops.extend_from_slice(ops);
    seeds.push(("records-ops-lz4".into(), compressed_ops));
    let mut group = records.clone();
    group.push(0x10);
    group.extend_from_slice(&(body.len() as u16).to_le_bytes());
    group.extend_from_slice(&body);
    group.extend_from_slice(&[2, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    seeds.push(("records-group-then-seal".into(), group));
    let mut bad_crc = records.clone();
    bad_crc[1] = 0x80;
    seeds.push(("records-bad-body-crc".into(), bad_crc));
    let mut skipped = records;
    skipped[1] = 0x40;
    seeds.push(("records-skipped-seq".into(), skipped));
    seeds
}

#[test]
fn engine_made_seeds_pass() {
    let seeds = engine_made_seeds();
    let write_to = std::env::var_os("CHATLOG_WRITE_FUZZ_CORPUS").map(|_| corpus_dir());
    let mut opened = 0;
    for (name, data) in &seeds {
        let o = run(name, data);
        opened += o.opened as usize;
        if name.ends_with("-raw") && !name.starts_with("empty") {
            assert!(
                o.opened && o.entries > 0 && o.read_errors == 0,
                "{name}: {o:?}"
            );
        }
        if name.ends_with("-cut-tail") {
            assert!(
                !o.opened,
                "{name}: a segment cut short is damage (segments are created at full \
                 length), refused: {o:?}"
            );
        }
        if let Some(dir) = &write_to {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
    eprintln!("engine-made seeds: {} inputs, {opened} opened", seeds.len());
    assert!(seeds.len() >= 24);
}
