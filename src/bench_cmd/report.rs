//! What a run measured, and how it is printed: the table for people, `--json` for
//! machines, the live progress line, and the embedded server's CPU and memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_wire::client::ClientError;
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use super::dist::OpKind;

/// Highest latency a histogram holds, in µs (an hour); longer ones are recorded as this.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A latency histogram in µs with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Records `d` in µs (at least 1, at most [`LATENCY_US_MAX`]).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).clamp(1, LATENCY_US_MAX));
}

/// The error kind of a failed call: the protocol's code without `ERROR_CODE_`, or the
/// client's own (`TIMEOUT`, `DISCONNECTED`, …), as the client commands print them.
pub fn error_kind(e: ClientError) -> String {
    crate::client_cmd::CmdError::from(e).code
}

/// What one worker measured; workers' stats are merged at the end.
#[derive(Debug)]
pub struct Stats {
    /// Every measured operation (after warm-up).
    pub all: Histogram<u64>,
    /// Per operation kind, when a scenario has several.
    pub by_kind: BTreeMap<OpKind, Histogram<u64>>,
    /// Payload bytes moved in the measured window: message text sent plus message text
    /// read back.
    pub bytes: u64,
    /// Events read (history, sync) in the measured window.
    pub events: u64,
    /// Failed operations by kind, warm-up included.
    pub errors: BTreeMap<String, u64>,
    /// Sends acknowledged, warm-up included.
    pub sends_acked: u64,
    /// The highest seq acknowledged per chat, warm-up included.
    pub acked: std::collections::HashMap<u64, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            all: histogram(),
            by_kind: BTreeMap::new(),
            bytes: 0,
            events: 0,
            errors: BTreeMap::new(),
            sends_acked: 0,
            acked: Default::default(),
        }
    }
}

impl Stats {
    /// Records one measured operation of `kind`.
    pub fn op(&mut self, kind: OpKind, d: Duration) {
        record(&mut self.all, d);
        record(self.by_kind.entry(kind).or_insert_with(histogram), d);
    }

    /// Counts one failure.
    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    /// Adds another worker's figures.
    pub fn merge(&mut self, other: Stats) {
        self.all.add(&other.all).expect("same bounds");
        for (k, h) in other.by_kind {
            self.by_kind
                .entry(k)
                .or_insert_with(histogram)
                .add(&h)
                .expect("same bounds");
        }
        self.bytes += other.bytes;
        self.events += other.events;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.sends_acked += other.sends_acked;
        for (chat, seq) in other.acked {
            let max = self.acked.entry(chat).or_default();
            *max = (*max).max(seq);
        }
    }
}

/// p50/p90/p99/p99.9/max (and mean, count) of a histogram, in µs.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0, "mean": 0.0, "count": 0});
    }
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
        "count": h.len(),
    })
}

/// Counters the progress line reads while workers run.
#[derive(Debug, Default)]
pub struct Live {
    /// Operations completed (warm-up included).
    pub ops: AtomicU64,
    /// Operations failed.
    pub errors: AtomicU64,
}

/// The live progress line on stderr (hidden when stderr is not a terminal): phase, ops,
/// ops/s over the last tick, errors, elapsed.
#[derive(Debug)]
pub struct Progress {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts updating every 250 ms from `live`.
    pub fn start(phase: &str, live: Arc<Live>) -> Progress {
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("valid template"),
        );
        let phase = phase.to_owned();
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let ops = live.ops.load(Ordering::Relaxed);
                let errors = live.errors.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (ops - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, ops);
                b.set_message(format!(
                    "{phase}: {ops} ops, {rate:.0} ops/s, {errors} errors"
                ));
                b.tick();
            }
        });
        Progress { bar, ticker }
    }

    /// Stops and erases the line.
    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// `/proc` reports CPU times in USER_HZ ticks, 100 per second on every Linux.
const USER_HZ: f64 = 100.0;

/// utime + stime of a `/proc/.../stat` line, in seconds, and the thread's name.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / USER_HZ))
}

/// CPU seconds of the embedded server: the whole process (exited threads included) less
/// the load generator's own threads, which are named with `client_prefix`.
///
/// The client threads are read before the whole process, so CPU spent between the reads
/// counts as the server's at most, never as a negative. Tick-rounded per-thread and
/// whole-process times still disagree by a tick or two; [`cpu_delta`] takes that out of
/// a difference of two samples.
pub fn server_cpu_secs(client_prefix: &str) -> Option<f64> {
    let mut clients = 0.0;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((name, secs)) = parse_stat(&stat)
            && name.starts_with(client_prefix)
        {
            clients += secs;
        }
    }
    let (_, total) = parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some((total - clients).max(0.0))
}

/// CPU seconds of this whole process so far (user + system, every thread): with
/// `--server`, the load generator's own CPU, so a report shows whether the client side
/// could have bounded a figure.
pub fn process_cpu_secs() -> Option<f64> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?).map(|(_, secs)| secs)
}

/// CPU seconds between two [`server_cpu_secs`] samples. The samples are sums of times
/// the kernel rounds to ticks separately per thread and per process, so a window in
/// which the server did (almost) nothing can come out a tick below zero: that reads as
/// zero, not as a negative CPU time.
pub fn cpu_delta(start: f64, end: f64) -> f64 {
    (end - start).max(0.0)
}

/// Resident memory of this process (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The final report: fields every scenario has, plus scenario-specific ones.
#[derive(Debug)]
pub struct Report {
    pub scenario: &'static str,
    /// The flags, as JSON, and as a command line that repeats the run.
    pub config: Map<String, Value>,
    pub command: String,
    /// The histogram behind `latency_us`, and what it measures.
    pub latency: Histogram<u64>,
    pub latency_of: &'static str,
    /// Operations behind `throughput_ops`, and what they are.
    pub ops: u64,
    pub ops_of: &'static str,
    pub bytes: u64,
    pub measured_secs: f64,
    pub warmup_note: String,
    pub errors: BTreeMap<String, u64>,
    /// Per-kind latency (`by_kind` in JSON) when more than one kind ran.
    pub by_kind: BTreeMap<OpKind, Histogram<u64>>,
    /// Scenario-specific figures, printed as `key: value` rows and merged into the JSON.
    pub extra: Map<String, Value>,
    /// `server` in JSON, when embedded.
    pub server: Option<Value>,
}

impl Report {
    fn throughput(&self) -> (f64, f64) {
        if self.measured_secs <= 0.0 {
            return (0.0, 0.0);
        }
        (
            self.ops as f64 / self.measured_secs,
            self.bytes as f64 / 1e6 / self.measured_secs,
        )
    }

    /// The `--json` object.
    pub fn to_json(&self) -> Value {
        let (ops_s, mb_s) = self.throughput();
        let mut out = Map::new();
        out.insert("scenario".into(), json!(self.scenario));
        out.insert("throughput_ops".into(), json!(round2(ops_s)));
        out.insert("throughput_mb".into(), json!(round3(mb_s)));
        out.insert("ops".into(), json!(self.ops));
        out.insert("ops_are".into(), json!(self.ops_of));
        out.insert("bytes".into(), json!(self.bytes));
        out.insert("measured_secs".into(), json!(round3(self.measured_secs)));
        out.insert("warmup".into(), json!(self.warmup_note));
        out.insert("latency_us".into(), latency_json(&self.latency));
        out.insert("latency_of".into(), json!(self.latency_of));
        let total: u64 = self.errors.values().sum();
        out.insert("errors".into(), json!(total));
        out.insert("errors_by_kind".into(), json!(self.errors));
        if !self.by_kind.is_empty() {
            let by: Map<String, Value> = self
                .by_kind
                .iter()
                .map(|(k, h)| {
                    (
                        k.name().to_owned(),
                        json!({"ops": h.len(), "latency_us": latency_json(h)}),
                    )
                })
                .collect();
            out.insert("by_kind".into(), Value::Object(by));
        }
        for (k, v) in &self.extra {
            out.insert(k.clone(), v.clone());
        }
        if let Some(server) = &self.server {
            out.insert("server".into(), server.clone());
        }
        out.insert("config".into(), Value::Object(self.config.clone()));
        out.insert("command".into(), json!(self.command));
        Value::Object(out)
    }

    /// The table for people.
    pub fn to_table(&self) -> String {
        let (ops_s, mb_s) = self.throughput();
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row("scenario", self.scenario.to_owned());
        row(
            "throughput",
            format!(
                "{ops_s:.0} ops/s, {mb_s:.2} MB/s ({} {} in {:.2} s)",
                self.ops, self.ops_of, self.measured_secs
            ),
        );
        row("warm-up", self.warmup_note.clone());
        let lat = |h: &Histogram<u64>| {
            if h.is_empty() {
                return "no samples".to_owned();
            }
            format!(
                "p50 {} p90 {} p99 {} p99.9 {} max {}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max())
            )
        };
        row(
            &format!("latency ({})", self.latency_of),
            lat(&self.latency),
        );
        if self.by_kind.len() > 1 {
            for (k, h) in &self.by_kind {
                row(&format!("  {} ({} ops)", k.name(), h.len()), lat(h));
            }
        }
        for (k, v) in &self.extra {
            row(k, compact(v));
        }
        let total: u64 = self.errors.values().sum();
        let kinds: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        row(
            "errors",
            if kinds.is_empty() {
                "0".to_owned()
            } else {
                format!("{total} ({})", kinds.join(", "))
            },
        );
        if let Some(server) = &self.server {
            let get = |k: &str| server.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            row(
                "server (embedded)",
                format!(
                    "CPU {:.2} s = {:.2} cores over the measured window (server threads only); \
                     RSS {:.1} MiB at the end (whole process, load generator included)",
                    get("cpu_secs"),
                    get("cpu_cores"),
                    get("rss_bytes") / (1024.0 * 1024.0)
                ),
            );
        }
        let config: Vec<String> = self
            .config
            .iter()
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect();
        row("config", config.join(" "));
        row("repeat with", self.command.clone());
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<width$}  {v}\n"));
        }
        out
    }
}

/// µs as milliseconds for the table.
fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k} {}", compact(v)))
                .collect();
            parts.join(", ")
        }
        other => other.to_string(),
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse() {
        let line = "1234 (bench-client-1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let (name, secs) = parse_stat(line).unwrap();
        assert_eq!(name, "bench-client-1");
        assert!((secs - 3.0).abs() < 1e-9);
        assert!(server_cpu_secs("bench-client").is_some());
        // A window a tick "below zero" is no CPU, not negative CPU.
        assert_eq!(cpu_delta(1.25, 1.24), 0.0);
        assert!((cpu_delta(1.0, 1.5) - 0.5).abs() < 1e-12);
        assert!(rss_bytes().unwrap() > 0);
    }
}
