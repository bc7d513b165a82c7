//! The `media` scenario: concurrent whole-file uploads, then downloads of the same files,
//! through the protocol (`Client::upload_file` / `download_file`, the same code the
//! `upload` and `download` commands run; with `--sink`, `download_checked`, the same
//! download without an output file).
//!
//! What it owns: making the files (random, seeded, one per transfer so dedupe never
//! skips one), timing each phase and each file, checking what came back (the download
//! checks every chunk's CRC, and with `--verify-sha256` the whole file's SHA-256), sampling the process's memory
//! while transfers run, and the report. What it must not do: leave files behind (all
//! live in a temporary directory removed at the end) or run unbounded (`--count` files,
//! each at most 4 GiB).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatlog_wire::client::{DownloadCheck, DownloadOptions, UploadOptions, parse_media_id};
use rand::{RngCore, SeedableRng};
use serde_json::{Map, json};

use super::report::{self, Live, Progress, Report, Stats, error_kind, histogram};
use super::{BenchArgs, CLIENT_THREADS, World};
use crate::cli::CliError;

/// How often memory is sampled during the transfers.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Bytes of this process's memory: (anonymous, file-backed) resident, from
/// `/proc/self/status`. Mapped media files count as file-backed: page cache the kernel
/// can drop, not memory the server holds.
fn rss_split() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// Peak memory seen while a phase runs.
#[derive(Debug, Default)]
struct Peaks {
    anon: AtomicU64,
    file: AtomicU64,
    total: AtomicU64,
}

fn sample(peaks: &Peaks) {
    if let Some((anon, file)) = rss_split() {
        peaks.anon.fetch_max(anon, Ordering::Relaxed);
        peaks.file.fetch_max(file, Ordering::Relaxed);
    }
    if let Some(total) = report::rss_bytes() {
        peaks.total.fetch_max(total, Ordering::Relaxed);
    }
}

/// Writes `size` seeded random bytes to `path` in 1 MiB pieces; returns their SHA-256,
/// computed as they are made (before any timing), so the upload does not hash the file
/// again (`UploadOptions::sha256`, as a client that hashed its file first to ask for
/// dedupe would): the load generator's CPU stays off the figure the server is measured
/// by. The server hashes every byte it receives all the same and checks it at finish.
fn make_file(path: &PathBuf, size: u64, seed: u64) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    use std::io::Write;
    let mut sha = sha2::Sha256::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        sha.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(sha.finalize().into())
}

struct Phase {
    secs: f64,
    stats: Stats,
    bytes: u64,
    files: u64,
}

/// Runs the media scenario.
pub async fn media(args: &BenchArgs, world: &World, embedded: bool) -> Result<Report, CliError> {
    let files = args.count.unwrap_or(world.conns.len() as u64) as usize;
    let size = args.file_size;
    let dir = tempfile::Builder::new()
        .prefix("chatlog-bench-media-")
        .tempdir()?;
    let mut paths = Vec::with_capacity(files);
    for i in 0..files {
        let path = dir.path().join(format!("in-{i}"));
        let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let sha256 = tokio::task::block_in_place(|| make_file(&path, size, seed))?;
        paths.push((path, sha256));
    }
    let peaks = Arc::new(Peaks::default());
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peaks, sampling) = (Arc::clone(&peaks), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                sample(&peaks);
                tokio::time::sleep(MEMORY_SAMPLE_EVERY).await;
            }
        })
    };
    let rss_before = rss_split();
    let cpu0 = embedded
        .then(|| report::server_cpu_secs(CLIENT_THREADS))
        .flatten();
    let in_flight = args.in_flight;

    // Upload: file i through connection i mod C, all at once.
    let live = Arc::new(Live::default());
    let progress = Progress::start("media upload", Arc::clone(&live));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(files);
    let client_cpu0 = report::process_cpu_secs();
    for (i, (path, sha256)) in paths.iter().enumerate() {
        let client = world.conns[i % world.conns.len()].clone();
        let (path, sha256, live) = (path.clone(), *sha256, Arc::clone(&live));
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            // The last part's acknowledgement: the finish is what follows it.
            let mut last_part = t;
            let r = client
                .upload_file(
                    &path,
                    UploadOptions {
                        mime_type: "application/octet-stream".into(),
                        parts_in_flight: in_flight,
                        sha256: Some(sha256),
                        ..Default::default()
                    },
                    |_| {
                        last_part = Instant::now();
                        live.ops.fetch_add(1, Ordering::Relaxed);
                    },
                )
                .await;
            (r, t.elapsed(), last_part.elapsed())
        }));
    }
    let mut upload = Phase {
        secs: 0.0,
        stats: Stats::default(),
        bytes: 0,
        files: 0,
    };
    let mut ids = Vec::with_capacity(files);
    let mut finish_max = Duration::ZERO;
    for task in tasks {
        match task.await {
            Ok((Ok(done), took, finish)) => {
                finish_max = finish_max.max(finish);
                report::record(&mut upload.stats.all, took);
                upload.bytes += size;
                upload.files += 1;
                ids.push(parse_media_id(&done.media_id));
            }
            Ok((Err(e), _, _)) => {
                upload.stats.error(error_kind(e));
                ids.push(None);
            }
            Err(_) => {
                upload.stats.error("WORKER_FAILED");
                ids.push(None);
            }
        }
    }
    upload.secs = started.elapsed().as_secs_f64();
    let client_cpu1 = report::process_cpu_secs();
    progress.finish();
    sample(&peaks);
    let upload_peaks = (
        peaks.anon.swap(0, Ordering::Relaxed),
        peaks.file.swap(0, Ordering::Relaxed),
        peaks.total.swap(0, Ordering::Relaxed),
    );

    // Download: every file that uploaded, through the connection that uploaded it.
    let live = Arc::new(Live::default());
    let progress = Progress::start("media download", Arc::clone(&live));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(files);
    for (i, id) in ids.iter().enumerate() {
        let Some(id) = *id else { continue };
        let client = world.conns[i % world.conns.len()].clone();
        let out = dir.path().join(format!("out-{i}"));
        let live = Arc::clone(&live);
        let sink = args.sink;
        let check = if args.verify_sha256 {
            DownloadCheck::Sha256
        } else {
            DownloadCheck::PartCrcs
        };
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let progress = |_| {
                live.ops.fetch_add(1, Ordering::Relaxed);
            };
            let r = if sink {
                client
                    .download_checked(id, in_flight, check, progress)
                    .await
            } else {
                client
                    .download_file(
                        id,
                        &out,
                        DownloadOptions {
                            resume: false,
                            chunks_in_flight: in_flight,
                            check,
                        },
                        progress,
                    )
                    .await
            };
            // The copy was checked against the media id; free its space at once.
            let _ = std::fs::remove_file(&out);
            (r, t.elapsed())
        }));
    }
    let mut download = Phase {
        secs: 0.0,
        stats: Stats::default(),
        bytes: 0,
        files: 0,
    };
    for task in tasks {
        match task.await {
            Ok((Ok(n), took)) => {
                report::record(&mut download.stats.all, took);
                download.bytes += n;
                download.files += 1;
            }
            Ok((Err(e), _)) => download.stats.error(error_kind(e)),
            Err(_) => download.stats.error("WORKER_FAILED"),
        }
    }
    download.secs = started.elapsed().as_secs_f64();
    let client_cpu2 = report::process_cpu_secs();
    progress.finish();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    sample(&peaks);
    let cpu = match (
        cpu0,
        embedded
            .then(|| report::server_cpu_secs(CLIENT_THREADS))
            .flatten(),
    ) {
        (Some(a), Some(b)) => Some(report::cpu_delta(a, b)),
        _ => None,
    };
    drop(dir);

    // This process's CPU per phase: the load generator's alone with `--server`.
    let phase_cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => json!(report::round3(report::cpu_delta(a, b))),
        _ => serde_json::Value::Null,
    };
    let mb_s = |bytes: u64, secs: f64| {
        report::round2(if secs > 0.0 {
            bytes as f64 / 1e6 / secs
        } else {
            0.0
        })
    };
    let mut extra = Map::new();
    extra.insert(
        "media".into(),
        json!({
            "file_bytes": size,
            "files": files,
            "parts_in_flight": in_flight.min(chatlog_wire::client::UPLOAD_PARTS_IN_FLIGHT_MAX),
            "download_to": if args.sink { "sink (checked, not kept)" } else { "file" },
            "download_check": if args.verify_sha256 { "chunk CRC-32s and SHA-256" } else { "chunk CRC-32s" },
            "upload": {
                "files": upload.files,
                "secs": report::round3(upload.secs),
                "mb_s": mb_s(upload.bytes, upload.secs),
                "latency_us": report::latency_json(&upload.stats.all),
                // From a file's last part acknowledged to its finish answered (the
                // server checks the hash and records the file), the longest of all.
                "finish_ms_max": report::round3(finish_max.as_secs_f64() * 1e3),
                "rss_anon_peak_bytes": upload_peaks.0,
                "rss_file_peak_bytes": upload_peaks.1,
                "rss_peak_bytes": upload_peaks.2,
                "process_cpu_secs": phase_cpu(client_cpu0, client_cpu1),
            },
            "download": {
                "files": download.files,
                "secs": report::round3(download.secs),
                "mb_s": mb_s(download.bytes, download.secs),
                "latency_us": report::latency_json(&download.stats.all),
                "rss_anon_peak_bytes": peaks.anon.load(Ordering::Relaxed),
                "rss_file_peak_bytes": peaks.file.load(Ordering::Relaxed),
                "rss_peak_bytes": peaks.total.load(Ordering::Relaxed),
                "process_cpu_secs": phase_cpu(client_cpu1, client_cpu2),
            },
            "rss_anon_before_bytes": rss_before.map_or(0, |r| r.0),
        }),
    );
    let mut all = histogram();
    let mut errors = upload.stats.errors.clone();
    all.add(&upload.stats.all).ok();
    all.add(&download.stats.all).ok();
    for (k, n) in download.stats.errors {
        *errors.entry(k).or_default() += n;
    }
    let measured = upload.secs + download.secs;
    Ok(Report {
        scenario: "media",
        config: Map::new(),
        command: String::new(),
        latency: all,
        latency_of: "one whole-file upload or download",
        ops: upload.files + download.files,
        ops_of: "files uploaded + files downloaded",
        bytes: upload.bytes + download.bytes,
        measured_secs: measured,
        warmup_note: "not used: every file is timed from its first request to its last answer"
            .to_owned(),
        errors,
        by_kind: Default::default(),
        extra,
        server: cpu.map(|cpu| {
            json!({
                "cpu_secs": report::round3(cpu),
                "cpu_cores": report::round3(if measured > 0.0 { cpu / measured } else { 0.0 }),
                "rss_bytes": report::rss_bytes().unwrap_or(0),
            })
        }),
    })
}
