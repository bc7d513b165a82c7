//! Crash test of the storage engine: a child process (`chatlog storage load`) appends
//! batches and reports each durable entry on stdout; this parent kills it with SIGKILL at a
//! seeded random moment, reopens the data directory in-process and checks what survived.
//! The same directory is used for every round, so recovery also recovers recovered data,
//! and small segments make rotation, seals, checkpoints and recycling happen in the run.
//!
//! Properties checked after every kill (one checker each):
//! - `reported_entries_survive`: every entry reported durable is still held (unless a
//!   reported purge removed it), with the payload derived from (log, index, seed).
//! - `logs_are_dense`: every index between a log's first and last is readable.
//! - `unreported_entries_are_whole`: entries past the reported frontier (durable but not yet
//!   reported when the child died) carry their exact payload too: nothing is half-visible.
//! - `purges_are_atomic`: a log's first index moved only by a reported purge, or by an
//!   unreported one whose batch (with its appends) survived whole.
//!
//! Seeded: `CHATLOG_CRASH_SEED=<n>` replays a run, `CHATLOG_CRASH_ROUNDS=<n>` sets the
//! number of rounds (default 300; raise it for a soak). The seed is printed at the start
//! and in every failure message.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chatlog::storage_cmd::check_payload;
use chatlog_storage::{Config, Engine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_ROUNDS: u64 = 300;
/// Logs the child appends to.
const LOGS: u64 = 6;
/// Segment size shared by child and parent: the smallest the engine accepts, so a round
/// of a few dozen batches crosses segment boundaries.
const SEGMENT_BYTES: u64 = 256 << 10;
/// Retained entries per log before the child purges the older half.
const RETAIN_ENTRIES: u64 = 1_000;
/// Longest a child may take to produce the reports a round waits for: far beyond what it
/// needs, so hitting it means the child hung.
const CHILD_REPORT_TIMEOUT: Duration = Duration::from_secs(60);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

/// What the parent knows of one log: everything reported or verified so far.
#[derive(Debug, Default, Clone, Copy)]
struct Expected {
    /// Highest index reported durable or seen after a reopen (0: none yet).
    durable_last: u64,
    /// Every entry below this is gone (reported purges and verified first indexes).
    purged_before: u64,
}

/// A reported line of the child.
fn parse_report(line: &str, expected: &mut BTreeMap<u64, Expected>) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        words
            .get(i)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("bad report line {line:?}"))
    };
    match words.first() {
        Some(&"durable") => {
            let (log, first, last) = (num(1)?, num(2)?, num(3)?);
            if first > last {
                return Err(format!("bad range in {line:?}"));
            }
            let e = expected.entry(log).or_default();
            e.durable_last = e.durable_last.max(last);
        }
        Some(&"purged") => {
            let (log, index) = (num(1)?, num(2)?);
            let e = expected.entry(log).or_default();
            e.purged_before = e.purged_before.max(index);
        }
        Some(&"open") => {}
        _ => return Err(format!("unexpected line from the child: {line:?}")),
    }
    Ok(())
}

struct Round {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout_reader: std::thread::JoinHandle<()>,
    stderr_reader: std::thread::JoinHandle<String>,
}

fn spawn_child(dir: &Path, seed: u64, entry_bytes: usize, batch_entries: usize) -> Round {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog"))
        .args(["storage", "load", "--dir"])
        .arg(dir)
        .args(["--logs", &LOGS.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--entry-bytes", &entry_bytes.to_string()])
        .args(["--segment-bytes", &SEGMENT_BYTES.to_string()])
        .args(["--batch-entries", &batch_entries.to_string()])
        .args(["--writers", "2"])
        .args(["--retain-entries", &RETAIN_ENTRIES.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatlog storage load");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, lines) = mpsc::channel();
    let stdout_reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                // Only whole lines count: a line cut by the kill was never fully reported.
                Ok(n) if n > 0 && line.ends_with('\n') => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    Round {
        child,
        lines,
        stdout_reader,
        stderr_reader,
    }
}

/// Reopens the directory and checks every property against `expected`; then makes
/// `expected` what was found, for the next round.
fn check_recovered(
    dir: &Path,
    seed: u64,
    entry_bytes: usize,
    expected: &mut BTreeMap<u64, Expected>,
) -> Result<(), String> {
    let mut cfg = Config::new(dir);
    cfg.segment_bytes = SEGMENT_BYTES;
    let engine = Engine::open(cfg).map_err(|e| format!("reopen failed: {e}"))?;
    for log in engine.logs() {
        if !(1..=LOGS).contains(&log) {
            return Err(format!("log {log} exists but was never written"));
        }
    }
    for log in 1..=LOGS {
        let e = expected.get(&log).copied().unwrap_or_default();
        let Some(bounds) = engine.bounds(log) else {
            if e.durable_last > 0 {
                return Err(format!(
                    "reported_entries_survive: log {log} is gone, {} was reported durable",
                    e.durable_last
                ));
            }
            continue;
        };
        if bounds.next <= e.durable_last {
            return Err(format!(
                "reported_entries_survive: log {log} ends at {}, {} was reported durable",
                bounds.next - 1,
                e.durable_last
            ));
        }
        if bounds.first < e.purged_before.max(1) {
            return Err(format!(
                "purges_are_atomic: log {log} starts at {} after a purge before {} was reported",
                bounds.first, e.purged_before
            ));
        }
        if bounds.first > e.purged_before.max(1) {
            // An unreported purge: its batch also appended up to first + RETAIN/2 - 1.
            if bounds.next < bounds.first + RETAIN_ENTRIES / 2 {
                return Err(format!(
                    "purges_are_atomic: log {log} was purged to {} (reported: {}) but its \
                     batch's appends up to {} are missing (next is {})",
                    bounds.first,
                    e.purged_before,
                    bounds.first + RETAIN_ENTRIES / 2 - 1,
                    bounds.next
                ));
            }
        }
        let mut index = bounds.first;
        while index < bounds.next {
            let entries = engine
                .read(log, index..bounds.next, 1 << 20)
                .map_err(|err| format!("logs_are_dense: log {log} entry {index}: {err}"))?;
            for payload in entries {
                let which = if index <= e.durable_last {
                    "reported_entries_survive"
                } else {
                    "unreported_entries_are_whole"
                };
                check_payload(log, index, seed, Some(entry_bytes), &payload)
                    .map_err(|d| format!("{which}: {d}"))?;
                index += 1;
            }
        }
        expected.insert(
            log,
            Expected {
                durable_last: bounds.next - 1,
                purged_before: bounds.first,
            },
        );
    }
    engine.close().map_err(|e| format!("close failed: {e}"))
}

#[test]
fn reported_entries_survive_sigkill() {
    let seed = env_u64("CHATLOG_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let rounds = env_u64("CHATLOG_CRASH_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    eprintln!(
        "storage crash test: seed={seed} rounds={rounds} (CHATLOG_CRASH_SEED / CHATLOG_CRASH_ROUNDS)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // One payload length for the whole run: the parent checks exact lengths.
    let entry_bytes = [16usize, 64, 300][rng.random_range(0..3)];
    let payload_seed = rng.random::<u64>();
    let mut expected: BTreeMap<u64, Expected> = BTreeMap::new();
    let started = Instant::now();
    let mut reports_total = 0u64;
    for round in 0..rounds {
        let fail = |what: String| -> ! {
            panic!("seed={seed} round={round} entry_bytes={entry_bytes}: {what}");
        };
        let batch_entries = rng.random_range(4..=96usize);
        let mut r = spawn_child(&data, payload_seed, entry_bytes, batch_entries);
        let mut reports: Vec<String> = Vec::new();
        if rng.random_bool(0.1) {
            // Kill early, maybe in the middle of recovery or opening.
            std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        } else {
            // Kill after a random number of durable reports, then a random short while.
            let wait_for = rng.random_range(1..=60usize);
            let deadline = Instant::now() + CHILD_REPORT_TIMEOUT;
            while reports.iter().filter(|l| l.starts_with("durable")).count() < wait_for {
                let left = deadline.saturating_duration_since(Instant::now());
                match r.lines.recv_timeout(left) {
                    Ok(line) => reports.push(line),
                    Err(_) => {
                        let _ = r.child.kill();
                        let _ = r.child.wait();
                        let stderr = r.stderr_reader.join().unwrap_or_default();
                        fail(format!(
                            "child stopped reporting after {} lines; stderr:\n{stderr}",
                            reports.len()
                        ));
                    }
                }
            }
            let extra_us = rng.random_range(0..2_000u64);
            if extra_us > 0 {
                std::thread::sleep(Duration::from_micros(extra_us));
            }
        }
        r.child.kill().expect("SIGKILL the child");
        let status = r.child.wait().expect("reap the child");
        // Lines the child wrote before it died are reports too: drain to end of file.
        r.stdout_reader.join().expect("stdout reader");
        reports.extend(r.lines.try_iter());
        let stderr = r.stderr_reader.join().unwrap_or_default();
        if status.code().is_some() {
            fail(format!(
                "child exited by itself ({status}) instead of being killed; stderr:\n{stderr}"
            ));
        }
        reports_total += reports.len() as u64;
        for line in &reports {
            parse_report(line, &mut expected).unwrap_or_else(|e| fail(e));
        }
        check_recovered(&data, payload_seed, entry_bytes, &mut expected)
            .unwrap_or_else(|e| fail(format!("{e}\nchild stderr:\n{stderr}")));
    }
    let held: u64 = expected
        .values()
        .map(|e| e.durable_last + 1 - e.purged_before.max(1))
        .sum();
    eprintln!(
        "storage crash test: seed={seed}: {rounds} rounds, {reports_total} report lines, \
         {held} entries held at the end, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        rounds == 0 || reports_total > 0,
        "seed={seed}: the child never reported anything"
    );
}
