//! `chatlog storage …`: commands that drive the storage engine directly, with no server.
//!
//! - `demo` is the README's first command until the server exists: it appends entries
//!   across many logs in durable batches, reopens the engine, verifies every entry and
//!   prints the backend, the append rate and the restart time.
//! - `load` is the child process of the crash test (`tests/storage_crash.rs`): it appends
//!   forever and reports every durable entry on stdout, so the parent can kill it with
//!   SIGKILL at any moment and check that everything reported survived.
//!
//! Both derive every payload from `(log, index, seed)` ([`payload`]), so anyone holding
//! the seed can check any entry ([`check_payload`]) without keeping a copy. This module
//! uses only the public API of `chatlog_storage`; it must not reach into engine internals.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_storage::{Config, Engine, LogId, WriteBatch};
use clap::{Args, Subcommand};

use crate::cli::CliError;

/// Entries per durable write batch in the demo: the batch size the benchmarks use.
const DEMO_BATCH_ENTRIES: usize = 256;
/// Writer threads in the demo, each with its own share of the logs, so group commit can
/// merge their batches into one fdatasync.
const DEMO_WRITERS: usize = 4;
/// Largest entry either command writes: entries are messages, not media.
const ENTRY_BYTES_MAX: usize = 1 << 20;
/// Payload bytes gathered per read call while verifying.
const VERIFY_READ_BYTES_MAX: usize = 4 << 20;
/// How often the demo redraws its progress line.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Seed of the demo's payloads: fixed, so a second run can verify the first run's entries.
const DEMO_SEED: u64 = 0x6368_6174_6c6f_6721;

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Append entries in durable batches, reopen, verify every entry, report the speed.
    ///
    /// Appends entries across many logs in durable batches, reopens the engine, verifies
    /// every entry, and reports the I/O backend, entries/s and restart time. Running it
    /// again on the same directory continues every log and verifies the older entries too.
    Demo(DemoArgs),
    /// Crash-test child: append forever, reporting every durable entry on stdout.
    ///
    /// Appends batches forever (or `--batches` times) and, after each batch is durable, prints
    /// `durable <log> <first> <last>` (an inclusive range of that log's entries in the
    /// batch) and, for retention purges, `purged <log> <index>` (every entry below index
    /// is gone). Stdout is flushed after every batch. Payloads are derived from (log,
    /// index, seed), so a parent can verify them after killing this process.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory of the engine. Defaults to ./chatlog-data/storage-demo (kept between
    /// runs: a second run continues the same logs and verifies everything in them).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of logs the entries are spread over (log ids 1..=N).
    #[arg(long, default_value_t = 1000)]
    pub logs: u64,
    /// Number of entries to append in total.
    #[arg(long, default_value_t = 200_000)]
    pub entries: u64,
    /// Payload bytes of each entry.
    #[arg(long, default_value_t = 256)]
    pub entry_bytes: usize,
    /// Size of each preallocated segment file, in bytes (multiple of 4096, at least 256 KiB).
    #[arg(long, default_value_t = 64 << 20)]
    pub segment_bytes: u64,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Data directory of the engine (created if missing, recovered if not).
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of logs to append to (log ids 1..=N).
    #[arg(long)]
    pub logs: u64,
    /// Seed of the payloads (and of nothing else: batch shapes are fixed).
    #[arg(long)]
    pub seed: u64,
    /// Payload bytes of each entry.
    #[arg(long, default_value_t = 64)]
    pub entry_bytes: usize,
    /// Size of each preallocated segment file, in bytes (multiple of 4096, at least 256 KiB).
    /// Small segments make rotation, seals and checkpoints happen often.
    #[arg(long, default_value_t = 256 << 10)]
    pub segment_bytes: u64,
    /// Entries per write batch (spread over consecutive logs, several per log).
    #[arg(long, default_value_t = 64)]
    pub batch_entries: usize,
    /// Concurrent writer threads (each owns the logs with `log % writers == k`), so group
    /// commit merges batches.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// When a log holds more than this many entries, the batch that grows it also purges
    /// its oldest entries down to half of this (0: never purge). Purges free segments, so
    /// recycling runs too.
    #[arg(long, default_value_t = 0)]
    pub retain_entries: u64,
    /// Stop after this many batches per writer (0: run until killed).
    #[arg(long, default_value_t = 0)]
    pub batches: u64,
}

pub fn run(cmd: StorageCommand) -> Result<(), CliError> {
    match cmd {
        StorageCommand::Demo(args) => demo(args),
        StorageCommand::Load(args) => load(args),
    }
}

/// SplitMix64: a tiny, well-mixed generator, so payloads need no dependency.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The payload of entry `index` of `log` under `seed`: `len` bytes of a stream that is a
/// function of `(log, index, seed)` alone, so a shorter payload is a prefix of a longer one.
pub fn payload(log: LogId, index: u64, seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ log.wrapping_mul(0xa076_1d64_78bd_642f) ^ index.rotate_left(32);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Checks that `bytes` is the payload of `(log, index, seed)` of length `len` (or of any
/// length if `len` is `None`). The error says what differs.
pub fn check_payload(
    log: LogId,
    index: u64,
    seed: u64,
    len: Option<usize>,
    bytes: &[u8],
) -> Result<(), String> {
    if let Some(len) = len
        && bytes.len() != len
    {
        return Err(format!(
            "log {log} entry {index}: {} bytes where {len} were written",
            bytes.len()
        ));
    }
    let expected = payload(log, index, seed, bytes.len());
    match expected.iter().zip(bytes).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => Err(format!(
            "log {log} entry {index}: byte {at} is {:#04x}, expected {:#04x}",
            bytes[at], expected[at]
        )),
    }
}

fn config(dir: PathBuf, segment_bytes: u64) -> Config {
    let mut c = Config::new(dir);
    c.segment_bytes = segment_bytes;
    c
}

fn check_entry_bytes(entry_bytes: usize) -> Result<(), CliError> {
    if entry_bytes == 0 || entry_bytes > ENTRY_BYTES_MAX {
        return Err(format!("--entry-bytes must be within 1..={ENTRY_BYTES_MAX}").into());
    }
    Ok(())
}

fn demo(args: DemoArgs) -> Result<(), CliError> {
    check_entry_bytes(args.entry_bytes)?;
    if args.logs == 0 {
        return Err("--logs must be at least 1".into());
    }
    let dir = args
        .dir
        .unwrap_or_else(|| crate::cli::default_data_dir().join("storage-demo"));
    let cfg = config(dir.clone(), args.segment_bytes);
    let opened = Instant::now();
    let engine = Arc::new(Engine::open(cfg.clone())?);
    let open_ms = opened.elapsed().as_secs_f64() * 1000.0;
    println!("storage demo in {}", dir.display());
    println!(
        "  backend: {} (opened in {open_ms:.1} ms)",
        engine.io_backend()
    );

    // Where each log continues: entries of earlier runs stay and are verified too.
    let starts: Vec<u64> = (1..=args.logs)
        .map(|log| engine.bounds(log).map_or(1, |b| b.next))
        .collect();
    let appended = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..DEMO_WRITERS)
        .map(|w| {
            let engine = engine.clone();
            let appended = appended.clone();
            let starts = starts.clone();
            let logs = args.logs;
            let entry_bytes = args.entry_bytes;
            // Writer `w` owns logs with `(log - 1) % DEMO_WRITERS == w` and its share of
            // the entries, dealt round-robin over its logs.
            let mine: Vec<LogId> = (1..=logs)
                .filter(|l| (l - 1) as usize % DEMO_WRITERS == w)
                .collect();
            let share = args.entries / DEMO_WRITERS as u64
                + u64::from((w as u64) < args.entries % DEMO_WRITERS as u64);
            std::thread::spawn(move || -> Result<(), chatlog_storage::Error> {
                if mine.is_empty() {
                    return Ok(());
                }
                let mut next: Vec<u64> = mine.iter().map(|l| starts[(*l - 1) as usize]).collect();
                let mut done = 0u64;
                let mut turn = 0usize;
                while done < share {
                    let mut batch = WriteBatch::new();
                    let n = (share - done).min(DEMO_BATCH_ENTRIES as u64);
                    for _ in 0..n {
                        let k = turn % mine.len();
                        turn += 1;
                        let log = mine[k];
                        batch.append(log, next[k], &payload(log, next[k], DEMO_SEED, entry_bytes));
                        next[k] += 1;
                    }
                    engine.write_blocking(&batch)?;
                    done += n;
                    appended.fetch_add(n, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut out = std::io::stdout();
    // Redraw a progress line only for a person watching; logs and pipes get the summary.
    let tty = out.is_terminal();
    while tty && writers.iter().any(|w| !w.is_finished()) {
        // A progress ticker, not synchronisation: the joins below wait for the writers.
        std::thread::sleep(PROGRESS_INTERVAL);
        let n = appended.load(Ordering::Relaxed);
        let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let _ = write!(
            out,
            "\r  appending: {n}/{} entries ({rate:.0} entries/s)   ",
            args.entries
        );
        let _ = out.flush();
    }
    for w in writers {
        w.join().map_err(|_| "a writer thread panicked")??;
    }
    let append_s = started.elapsed().as_secs_f64().max(1e-9);
    let n = appended.load(Ordering::Relaxed);
    let stats = engine.stats();
    println!(
        "{}  appended {n} entries of {} bytes over {} logs in {append_s:.2} s: \
         {:.0} entries/s, {:.1} MB/s, {} fdatasyncs (mean {:.0} µs)",
        if tty { "\r" } else { "" },
        args.entry_bytes,
        args.logs,
        n as f64 / append_s,
        (n as f64 * args.entry_bytes as f64) / append_s / 1e6,
        stats.syncs,
        stats.sync_mean_us,
    );

    let engine =
        Arc::try_unwrap(engine).map_err(|_| "engine still shared after the writers ended")?;
    engine.close()?;
    let reopened = Instant::now();
    let engine = Engine::open(cfg)?;
    let restart_ms = reopened.elapsed().as_secs_f64() * 1000.0;
    let stats = engine.stats();
    println!(
        "  restart: {restart_ms:.1} ms ({} segments, {} entries held, {} bytes of index memory)",
        stats.segments, stats.entries, stats.index_memory_bytes
    );

    let verifying = Instant::now();
    let mut verified = 0u64;
    let mut verified_this_run = 0u64;
    for log in 1..=args.logs {
        let Some(bounds) = engine.bounds(log) else {
            continue;
        };
        let written_from = starts[(log - 1) as usize];
        verified_this_run += bounds.next.saturating_sub(written_from);
        let mut index = bounds.first;
        while index < bounds.next {
            let entries = engine.read(log, index..bounds.next, VERIFY_READ_BYTES_MAX)?;
            for e in &entries {
                // Entries of this run have this run's length; older runs may have used
                // another --entry-bytes, and payloads of one seed are prefixes of each other.
                let len = (index >= written_from).then_some(args.entry_bytes);
                check_payload(log, index, DEMO_SEED, len, e)?;
                index += 1;
                verified += 1;
            }
        }
    }
    if verified_this_run != n {
        return Err(format!(
            "{verified_this_run} entries of this run found after reopening, {n} were appended"
        )
        .into());
    }
    let verify_s = verifying.elapsed().as_secs_f64().max(1e-9);
    println!(
        "  verified {verified} entries in {verify_s:.2} s ({:.0} entries/s): all intact",
        verified as f64 / verify_s
    );
    engine.close()?;
    Ok(())
}

/// One writer of `load`: appends to its logs forever (or `batches` times), reporting
/// durable ranges and purges after each batch.
struct LoadWriter {
    logs: Vec<LogId>,
    next: Vec<u64>,
    first: Vec<u64>,
    turn: usize,
}

impl LoadWriter {
    /// Builds the next batch and the report lines it earns once durable.
    fn next_batch(&mut self, args: &LoadArgs) -> (WriteBatch, String) {
        let mut batch = WriteBatch::new();
        let mut report = String::new();
        let mut left = args.batch_entries;
        // A few entries per log per batch: several logs share every record.
        let per_log = (args.batch_entries / 4).max(1);
        while left > 0 {
            let k = self.turn % self.logs.len();
            self.turn += 1;
            let log = self.logs[k];
            let n = per_log.min(left);
            let from = self.next[k];
            for i in from..from + n as u64 {
                batch.append(log, i, &payload(log, i, args.seed, args.entry_bytes));
            }
            self.next[k] += n as u64;
            left -= n;
            report.push_str(&format!("durable {log} {from} {}\n", self.next[k] - 1));
            if args.retain_entries > 0 && self.next[k] - self.first[k] > args.retain_entries {
                let keep_from = self.next[k] - args.retain_entries / 2;
                batch.purge_before(log, keep_from);
                self.first[k] = keep_from;
                report.push_str(&format!("purged {log} {keep_from}\n"));
            }
        }
        (batch, report)
    }
}

fn load(args: LoadArgs) -> Result<(), CliError> {
    check_entry_bytes(args.entry_bytes)?;
    if args.logs == 0 || args.writers == 0 || args.batch_entries == 0 {
        return Err("--logs, --writers and --batch-entries must be at least 1".into());
    }
    let opened = Instant::now();
    let engine = Arc::new(Engine::open(config(args.dir.clone(), args.segment_bytes))?);
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "open {} {:.1}",
            engine.io_backend(),
            opened.elapsed().as_secs_f64() * 1000.0
        )?;
        out.flush()?;
    }
    let args = Arc::new(args);
    let writers: Vec<_> = (0..args.writers)
        .map(|w| {
            let logs: Vec<LogId> = (1..=args.logs)
                .filter(|l| (*l % args.writers as u64) as usize == w)
                .collect();
            let bounds: Vec<_> = logs.iter().map(|l| engine.bounds(*l)).collect();
            let mut writer = LoadWriter {
                next: bounds.iter().map(|b| b.map_or(1, |b| b.next)).collect(),
                first: bounds.iter().map(|b| b.map_or(1, |b| b.first)).collect(),
                logs,
                turn: 0,
            };
            let engine = engine.clone();
            let args = args.clone();
            std::thread::spawn(move || -> Result<(), CliError> {
                if writer.logs.is_empty() {
                    return Ok(());
                }
                let mut written = 0u64;
                while args.batches == 0 || written < args.batches {
                    let (batch, report) = writer.next_batch(&args);
                    engine.write_blocking(&batch)?;
                    // Only now, with the batch durable, may the parent learn of it.
                    let mut out = std::io::stdout().lock();
                    out.write_all(report.as_bytes())?;
                    out.flush()?;
                    written += 1;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| "a writer thread panicked")??;
    }
    let engine =
        Arc::try_unwrap(engine).map_err(|_| "engine still shared after the writers ended")?;
    engine.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_prefixes_and_checked() {
        let long = payload(3, 9, 7, 100);
        let short = payload(3, 9, 7, 13);
        assert_eq!(&long[..13], &short[..]);
        assert!(check_payload(3, 9, 7, Some(100), &long).is_ok());
        assert!(check_payload(3, 9, 7, None, &short).is_ok());
        assert!(check_payload(3, 9, 7, Some(99), &long).is_err());
        assert!(check_payload(3, 10, 7, None, &long).is_err());
        assert!(check_payload(4, 9, 7, None, &long).is_err());
        assert!(check_payload(3, 9, 8, None, &long).is_err());
        let mut flipped = long.clone();
        flipped[50] ^= 1;
        assert!(check_payload(3, 9, 7, None, &flipped).is_err());
    }
}
