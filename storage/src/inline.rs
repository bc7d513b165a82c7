//! The inline engine mode (issue 9, deterministic simulation): the engine without
//! threads, selected at open with [`crate::EngineThreads::Inline`].
//!
//! In the default mode three OS threads do the engine's work (I/O, segment preparation,
//! maintenance), and when they run is up to the kernel. A simulator that wants one seed to
//! replay one exact history cannot have that: here every step runs on the caller's
//! thread, in the order the caller asks for it.
//!
//! - `submit` (and so `write().await`) queues the batch and at once leads the group
//!   commit on the caller's thread: the batch is validated, written and fdatasync'd
//!   through the engine's file system (in a simulation the fault-injecting one), indexed,
//!   and its durable callback called, all before `submit` returns. The same committer as
//!   in the threaded mode does it (`writer.rs`): only who calls it changes.
//! - The next segments are prepared ahead on the caller's thread before each commit
//!   ([`PREPARED_AHEAD`]), with salts from the configured seed instead of the clock.
//! - A sealed segment's index files and checkpoint are persisted, and dead segments freed,
//!   right after the commit that sealed it.
//! - Compaction runs only when asked ([`crate::Engine::compact_now`]): there is no timer.
//!
//! What it owns: the prepared-segment feed and the maintenance jobs of an inline engine.
//! What it must not do: block waiting for another thread (there is none: a wait would be
//! a deadlock), read a clock or draw a random number that reaches the disk, or be used
//! from more than one thread at a time (the prepared feed is topped up per commit for
//! one caller's batch; concurrent callers could need more segments in one commit).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::engine::{CompactionReport, Durable, Msg, Shared};
use crate::error::{Error, Result};
use crate::maintenance::{self, Job};
use crate::segment::Segment;
use crate::writer::{self, Lead};

/// Empty segments kept prepared ahead of the active one. A commit seals at most one
/// segment for a single caller's batch (a batch fits an empty segment), and a rotation
/// one more; two ahead means the committer never waits for a segment no thread would
/// make. Recovery drops prepared segments that were never written.
pub const PREPARED_AHEAD: u64 = 2;

/// What an inline engine keeps besides the shared state.
pub(crate) struct Inline {
    /// Feeds prepared segments to the committer (which holds the receiver).
    prepared: Mutex<Sender<Result<Arc<Segment>>>>,
    /// The id of the next segment to prepare, and the first id this engine prepared.
    next_segment_id: Mutex<u64>,
    first_prepared_id: u64,
    /// Jobs the committer sends (a sealed segment's checkpoint), run after each commit.
    jobs: Mutex<Receiver<Job>>,
    salt_seed: u64,
}

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inline")
            .field("first_prepared_id", &self.first_prepared_id)
            .field("salt_seed", &self.salt_seed)
            .finish()
    }
}

/// A segment's salt in inline mode: a splitmix64 of the seed and the id, so salts differ
/// between segments and between seeds (recycled files' old records must fail under the
/// new salt) and are the same in every replay of a seed.
fn salt(seed: u64, id: u64) -> u32 {
    let mut z = seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// Starts an inline engine: installs the committer (which may seal a recovered tail)
/// and runs what that produced. Called by `Engine::open_with` instead of spawning threads.
pub(crate) fn start(
    shared: &Arc<Shared>,
    io: crate::io::Writer,
    start: writer::Start,
    next_segment_id: u64,
    jobs: Receiver<Job>,
    salt_seed: u64,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let inline = Inline {
        prepared: Mutex::new(tx),
        next_segment_id: Mutex::new(next_segment_id),
        first_prepared_id: next_segment_id,
        jobs: Mutex::new(jobs),
        salt_seed,
    };
    if shared.inline.set(inline).is_err() {
        return Err(Error::Config("the inline engine was started twice".into()));
    }
    prepare_ahead(shared);
    let committer = writer::Committer::start(shared, rx, io, start)?;
    *shared.committer.lock().expect("committer lock") = Some(committer);
    run_jobs(shared);
    Ok(())
}

/// Whether `shared` runs inline.
pub(crate) fn is_inline(shared: &Shared) -> bool {
    shared.inline.get().is_some()
}

/// Keeps [`PREPARED_AHEAD`] segments prepared past the active one. A failure to prepare
/// is handed to the committer like the preparing thread does: it stops the engine when
/// the committer needs that segment.
fn prepare_ahead(shared: &Shared) {
    let Some(inline) = shared.inline.get() else {
        return;
    };
    let mut next = inline.next_segment_id.lock().expect("prepare lock");
    let active = shared.active.load(Ordering::SeqCst);
    // Prepared ids are consecutive from `first_prepared_id`; the ones above the active
    // segment are still waiting in the feed.
    let waiting = next.saturating_sub(active.saturating_add(1).max(inline.first_prepared_id));
    for _ in waiting..PREPARED_AHEAD {
        let recycled = shared.recycle.lock().expect("recycle lock").pop();
        let id = *next;
        let result = Segment::create_salted(
            shared.fs.as_ref(),
            &shared.config.dir,
            id,
            shared.config.segment_bytes,
            recycled,
            shared.config.preallocation,
            salt(inline.salt_seed, id),
        )
        .map(Arc::new);
        *next += 1;
        let failed = result.is_err();
        let _ = inline.prepared.lock().expect("prepared lock").send(result);
        if failed {
            return;
        }
    }
}

/// Runs the jobs commits produced (persisting checkpoints of sealed segments, freeing dead
/// ones). Skipped while a compaction on this thread holds the jobs: it runs them itself.
pub(crate) fn run_jobs(shared: &Shared) {
    let Some(inline) = shared.inline.get() else {
        return;
    };
    let Ok(jobs) = inline.jobs.try_lock() else {
        return;
    };
    while let Ok(job) = jobs.try_recv() {
        match job {
            Job::Sealed(checkpoint) => maintenance::persist(shared, &checkpoint),
            Job::Compact(reply) => drop(reply.send(Err(Error::Config(
                "compaction is requested through compact_now in inline mode".into(),
            )))),
            Job::Shutdown => {}
        }
    }
}

/// Queues `msg` and commits it (with anything queued before it) on this thread.
fn commit(shared: &Shared, msg: Msg) -> Result<()> {
    prepare_ahead(shared);
    if writer::enqueue(shared, msg, Lead::Caller)? {
        writer::lead(shared, None);
    }
    run_jobs(shared);
    Ok(())
}

/// `Engine::submit` inline: `on_durable` has been called when this returns `Ok`.
pub(crate) fn submit(
    shared: &Shared,
    encoded: crate::batch::EncodedBatch,
    on_durable: Durable,
    submitted: std::time::Instant,
) -> Result<()> {
    commit(shared, Msg::Write(encoded, on_durable, submitted))
}

/// `Engine::rotate_blocking` inline.
pub(crate) fn rotate(shared: &Shared) -> Result<()> {
    let outcome: Arc<Mutex<Option<Result<()>>>> = Arc::new(Mutex::new(None));
    let slot = outcome.clone();
    commit(
        shared,
        Msg::Rotate(Box::new(move |r| {
            *slot.lock().expect("rotate outcome") = Some(r);
        })),
    )?;
    let r = outcome.lock().expect("rotate outcome").take();
    r.unwrap_or(Err(Error::Closed))
}

/// `Engine::compact_now` inline: compaction on this thread, then its jobs.
pub(crate) fn compact_now(shared: &Shared) -> Result<CompactionReport> {
    let Some(inline) = shared.inline.get() else {
        return Err(Error::Closed);
    };
    let jobs = inline.jobs.lock().expect("jobs lock");
    maintenance::compact(shared, &jobs).map(|(report, _)| report)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::config::{Config, EngineThreads};
    use crate::engine::Engine;
    use crate::fault::{FaultyFileSystem, PowerCut};
    use crate::{Durable, WriteBatch};

    fn config(dir: &std::path::Path, salt_seed: u64) -> Config {
        let mut c = Config::new(dir);
        c.segment_bytes = 256 << 10;
        c.threads = EngineThreads::Inline { salt_seed };
        c
    }

    fn payload(log: u64, index: u64) -> Vec<u8> {
        format!("log={log} index={index} {}", "y".repeat(300)).into_bytes()
    }

    /// Polls a future once: inline submits never wait for another thread.
    fn ready<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("an inline engine call waited"),
        }
    }

    #[test]
    fn submits_are_durable_before_they_return_and_survive_rotation_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(config(dir.path(), 7)).unwrap();
        assert!(e.threads_is_empty_for_tests());
        for index in 1..=2_000u64 {
            let mut b = WriteBatch::new();
            b.append(1, index, &payload(1, index));
            let durable = Arc::new(AtomicBool::new(false));
            let flag = durable.clone();
            let done: Durable = Box::new(move |r| {
                r.unwrap();
                flag.store(true, Ordering::SeqCst);
            });
            ready(e.submit(&b, done)).unwrap();
            assert!(
                durable.load(Ordering::SeqCst),
                "index {index} not durable yet"
            );
        }
        let stats = e.stats();
        assert!(stats.segments >= 3, "rotation expected: {stats:?}");
        e.close().unwrap();
        let e = Engine::open(config(dir.path(), 7)).unwrap();
        for index in 1..=2_000u64 {
            assert_eq!(e.get(1, index).unwrap(), payload(1, index));
        }
        // Compaction on demand works without threads.
        let mut b = WriteBatch::new();
        b.purge_before(1, 1_900);
        ready(e.write(&b)).unwrap();
        // The seal's checkpoint is persisted on this thread and frees the dead segments.
        e.rotate_blocking().unwrap();
        assert!(e.stats().segments_freed > 0, "{:?}", e.stats());
        e.compact_now().unwrap();
        assert_eq!(e.get(1, 1_950).unwrap(), payload(1, 1_950));
    }

    /// One seed, one history: the same writes and the same power cut leave the same
    /// bytes on disk (salts come from the seed, not the clock).
    #[test]
    fn the_same_seed_leaves_the_same_bytes_after_a_power_cut() {
        let run = |seed: u64| -> Vec<(String, Vec<u8>)> {
            let dir = tempfile::tempdir().unwrap();
            let fs = FaultyFileSystem::with_power_cuts(seed);
            let e = Engine::open_with(config(dir.path(), seed), Arc::new(fs.clone())).unwrap();
            for index in 1..=900u64 {
                let mut b = WriteBatch::new();
                b.append(index % 3, index / 3 + 1, &payload(index % 3, index));
                ready(e.write(&b)).unwrap();
            }
            fs.cut_power(PowerCut::Torn).unwrap();
            drop(e);
            let e = Engine::open_with(config(dir.path(), seed), Arc::new(fs.reboot())).unwrap();
            drop(e);
            let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|f| {
                    let f = f.unwrap();
                    (
                        f.file_name().to_string_lossy().into_owned(),
                        std::fs::read(f.path()).unwrap(),
                    )
                })
                .collect();
            files.sort();
            files
        };
        let a = run(11);
        assert_eq!(a, run(11), "seed 11 replayed differently");
        assert_ne!(a, run(12), "another seed, another salt");
    }
}
