//! CPU per entry of the write path, without the disk: the engine on tmpfs (`/dev/shm`,
//! where fdatasync returns at once), 1,000 logs, batches of 256 entries on random logs,
//! like `benches/storage_figures.rs`. On a host shared with other builds the durable
//! figures follow other tenants' disk traffic; the CPU spent per entry (process CPU from
//! `getrusage`, every thread including io_uring workers; and the submitting thread's own)
//! moves far less, and the minimum of 5 runs is the least disturbed.
//!
//! `cargo run --release -p chatlog-storage --example write_cpu -- MODE [BYTES] [BATCHES]`
//! with MODE `pipelined` (one thread submits without waiting, as `append_buffered`) or
//! `blocking` (`write_blocking`, as `append_durable`). To run it against an engine
//! without `WriteBatch::with_capacity`, replace that call with `WriteBatch::new()`.
//! `blocking` also prints the p10 and p50 of one `write_blocking` call (batch built
//! beforehand) over every batch of every run: the engine's own latency per batch without
//! the disk, what a lone durable writer adds to `bound`'s write and fdatasync. The p10 is
//! the least disturbed by other tenants of a shared host.
use chatlog_storage::{Config, Engine, WriteBatch};
use std::time::Instant;

fn cpu_process() -> f64 {
    // SAFETY: `rusage` is plain integers (all-zero is valid), and getrusage writes one.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
fn cpu_thread() -> f64 {
    // SAFETY: `timespec` is plain integers (all-zero is valid).
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable `timespec`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
}

/// Runs per figure; the minimum and median are printed.
const REPEATS: usize = 5;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or("pipelined".into());
    let size: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(256);
    let batches: usize = std::env::args()
        .nth(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2000);
    let reps = REPEATS;
    let mut rng = Rng(7);
    let pool: Vec<u8> = (0..(4 << 20) + size).map(|_| rng.next() as u8).collect();
    let mut next = vec![1u64; 1001];
    let mut results = Vec::new();
    let mut calls_us: Vec<f64> = Vec::new();
    for _ in 0..reps {
        let dir = tempfile::tempdir_in(std::env::var("WRITE_CPU_DIR").unwrap_or("/dev/shm".into()))
            .unwrap();
        let engine = std::sync::Arc::new(Engine::open(Config::new(dir.path())).unwrap());
        let specs: Vec<Vec<(u64, u64, usize)>> = (0..batches)
            .map(|_| {
                let mut logs: Vec<u64> = (0..256).map(|_| 1 + rng.next() % 1000).collect();
                logs.sort_unstable();
                logs.into_iter()
                    .map(|l| {
                        let i = next[l as usize];
                        next[l as usize] += 1;
                        (l, i, (rng.next() % (4 << 20)) as usize)
                    })
                    .collect()
            })
            .collect();
        let build = |spec: &Vec<(u64, u64, usize)>| {
            let mut b = WriteBatch::with_capacity(spec.len(), spec.len() * size);
            for (l, i, at) in spec {
                b.append(*l, *i, &pool[*at..*at + size]);
            }
            b
        };
        let p0 = cpu_process();
        let t0 = cpu_thread();
        let w0 = Instant::now();
        if mode == "blocking" {
            for s in &specs {
                let b = build(s);
                let at = Instant::now();
                engine.write_blocking(&b).unwrap();
                calls_us.push(at.elapsed().as_secs_f64() * 1e6);
            }
        } else {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            rt.block_on(async {
                for s in &specs {
                    let b = build(s);
                    let tx = tx.clone();
                    engine
                        .submit(
                            &b,
                            Box::new(move |r| {
                                r.unwrap();
                                let _ = tx.send(());
                            }),
                        )
                        .await
                        .unwrap();
                }
            });
            drop(tx);
            assert_eq!(rx.iter().count(), specs.len());
        }
        let wall = w0.elapsed().as_secs_f64();
        let thread = cpu_thread() - t0;
        let process = cpu_process() - p0;
        let entries = (batches * 256) as f64;
        results.push((
            process / entries * 1e9,
            thread / entries * 1e9,
            entries / wall,
        ));
        drop(engine);
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let med = results[reps / 2];
    let min = results[0];
    let mut th: Vec<f64> = results.iter().map(|r| r.1).collect();
    th.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{mode} {size}B: process CPU ns/entry min {:.0} median {:.0}; caller thread ns/entry min {:.0} median {:.0}; entries/s at min {:.0}",
        min.0,
        med.0,
        th[0],
        th[reps / 2],
        min.2
    );
    if !calls_us.is_empty() {
        calls_us.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| calls_us[((calls_us.len() - 1) as f64 * f) as usize];
        println!(
            "{mode} {size}B: write_blocking per batch µs p10 {:.1} p50 {:.1} ({} calls)",
            q(0.1),
            q(0.5),
            calls_us.len()
        );
    }
}
