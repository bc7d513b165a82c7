//! An opt-in timeline of timestamped events across the engine, the Raft core and a load
//! generator, for explaining latency tails (issue 3: "bursts of late posts" at half load).
//!
//! Off unless a process calls [`enable`] (the `raft_figures` bench does when
//! `CHATLOG_RAFT_TIMELINE=path` is set). Off, [`record`] is one relaxed atomic load and a
//! branch. On, it is a clock read and an `fetch_add` on one counter plus three relaxed
//! stores into a fixed ring of [`TIMELINE_EVENTS_MAX`] slots: no lock, no allocation, no
//! I/O, so recording does not itself make the stalls it is meant to show. The newest
//! events win when the ring wraps. [`dump`] writes the ring as CSV, oldest first, once the
//! run is over (a slot written during the dump may come out torn; dump after the load).
//!
//! What it owns: the ring, its start instant and the event kinds. What it must not do:
//! block, allocate or do I/O on the recording path, or be on in a server that did not ask
//! for it. It lives in the storage crate because the engine's I/O thread records into it
//! too; `chatlog-raft` and the benches reach it as `chatlog_storage::timeline`.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Slots in the ring: 2^22 events × 24 B = 96 MiB, allocated only by [`enable`]. At the
/// half-load rate of R1 (~300,000 posts/s in ~7,000 entries/s, ~10 events per entry) it
/// holds the last ~40 s, more than one bench run.
pub const TIMELINE_EVENTS_MAX: usize = 1 << 22;

/// What happened. The `group` and `value` of each are documented per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    /// A proposal opened a new entry in the group's queue (value: 0).
    EntryOpened = 1,
    /// The batcher took an entry (value: its commands).
    EntryTaken = 2,
    /// `client_write_many` returned for the entry (value: its commands).
    Proposed = 3,
    /// The log store's `append` began (value: first Raft index).
    Append = 4,
    /// The log store handed the append to the engine (value: last Raft index).
    AppendSubmitted = 5,
    /// The engine began a group commit's write + fdatasync (group: 0; value: records).
    SyncStart = 6,
    /// The group commit is durable (group: 0; value: write + fdatasync µs).
    SyncEnd = 7,
    /// The append's `IOFlushed` was called (value: last Raft index).
    Flushed = 8,
    /// The state machine began applying a run of entries (value: first index).
    ApplyStart = 9,
    /// The state machine finished that run (value: entries applied).
    ApplyEnd = 10,
    /// The entry's proposers were answered (value: Raft index).
    Answered = 11,
    /// The checkpoint encode on the apply path began (value: applied index).
    CheckpointStart = 12,
    /// The checkpoint encode ended (value: bytes).
    CheckpointEnd = 13,
    /// The engine sealed its segment and switched to the next (value: new segment id).
    SegmentSwitch = 14,
    /// A maintenance job began (value: 0).
    MaintStart = 15,
    /// The maintenance job ended (value: µs).
    MaintEnd = 16,
    /// A 1 ms tokio probe task woke (group: 0; value: µs later than asked).
    RuntimeProbe = 20,
    /// A 1 ms OS-thread probe woke (group: 0; value: µs later than asked).
    ThreadProbe = 21,
    /// The load generator's task ran after a gap (value: µs since its previous run).
    GeneratorGap = 22,
    /// A post finished later than the target (group; value: its latency µs).
    LatePost = 23,
    /// A post was asked of the server late (group; value: µs after its intended time).
    AskedLate = 24,
    /// A 100 ms window of the open loop (group: the window's start, µs on the timeline's
    /// clock; value: its late posts).
    Window = 25,
    /// A thread of this process waited for a CPU while runnable (group: its thread id;
    /// value: µs waited on the run queue since its previous sample, from the kernel's
    /// `/proc/self/task/TID/schedstat`).
    RunQueueWait = 26,
    /// A thread of this process ran (group: its thread id; value: µs on a CPU since its
    /// previous sample).
    OnCpu = 27,
    /// A free-form mark (value: caller-defined).
    Mark = 30,
}

impl Event {
    /// The name written by [`dump`].
    pub fn name(self) -> &'static str {
        match self {
            Event::EntryOpened => "entry_opened",
            Event::EntryTaken => "entry_taken",
            Event::Proposed => "proposed",
            Event::Append => "append",
            Event::AppendSubmitted => "append_submitted",
            Event::SyncStart => "sync_start",
            Event::SyncEnd => "sync_end",
            Event::Flushed => "flushed",
            Event::ApplyStart => "apply_start",
            Event::ApplyEnd => "apply_end",
            Event::Answered => "answered",
            Event::CheckpointStart => "checkpoint_start",
            Event::CheckpointEnd => "checkpoint_end",
            Event::SegmentSwitch => "segment_switch",
            Event::MaintStart => "maint_start",
            Event::MaintEnd => "maint_end",
            Event::RuntimeProbe => "runtime_probe",
            Event::ThreadProbe => "thread_probe",
            Event::GeneratorGap => "generator_gap",
            Event::LatePost => "late_post",
            Event::AskedLate => "asked_late",
            Event::Window => "window",
            Event::RunQueueWait => "runqueue_wait",
            Event::OnCpu => "on_cpu",
            Event::Mark => "mark",
        }
    }

    fn from_u8(v: u8) -> Option<Event> {
        use Event::*;
        [
            EntryOpened,
            EntryTaken,
            Proposed,
            Append,
            AppendSubmitted,
            SyncStart,
            SyncEnd,
            Flushed,
            ApplyStart,
            ApplyEnd,
            Answered,
            CheckpointStart,
            CheckpointEnd,
            SegmentSwitch,
            MaintStart,
            MaintEnd,
            RuntimeProbe,
            ThreadProbe,
            GeneratorGap,
            LatePost,
            AskedLate,
            Window,
            RunQueueWait,
            OnCpu,
            Mark,
        ]
        .into_iter()
        .find(|e| *e as u8 == v)
    }
}

struct Ring {
    start: Instant,
    /// Per slot: ns since `start` (+1, so 0 means never written), kind | thread | group,
    /// value.
    slots: Box<[[AtomicU64; 3]]>,
    next: AtomicU64,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static RING: OnceLock<Ring> = OnceLock::new();
static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// A small number per recording thread (1, 2, …), in the order threads first record.
    static THREAD: u64 = THREADS.fetch_add(1, Ordering::Relaxed) + 1;
}

/// Turns recording on for this process (idempotent). Allocates the ring.
pub fn enable() {
    RING.get_or_init(|| Ring {
        start: Instant::now(),
        slots: (0..TIMELINE_EVENTS_MAX)
            .map(|_| [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)])
            .collect(),
        next: AtomicU64::new(0),
    });
    ENABLED.store(true, Ordering::Release);
}

/// Whether recording is on.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Records `event` for `group` with `value` (see [`Event`] for what each carries).
#[inline]
pub fn record(event: Event, group: u64, value: u64) {
    if enabled() {
        record_on(event, group, value);
    }
}

#[cold]
fn record_on(event: Event, group: u64, value: u64) {
    let Some(ring) = RING.get() else { return };
    let t = ring.start.elapsed().as_nanos() as u64 + 1;
    let thread = THREAD.with(|t| *t) & 0xff;
    let i = (ring.next.fetch_add(1, Ordering::Relaxed) as usize) % ring.slots.len();
    let slot = &ring.slots[i];
    slot[0].store(t, Ordering::Relaxed);
    slot[1].store(
        (event as u64) << 56 | thread << 48 | (group & 0xffff_ffff_ffff),
        Ordering::Relaxed,
    );
    slot[2].store(value, Ordering::Relaxed);
}

/// `group` tagged with the replica that records it: bits 32..48 carry a tag of `engine`
/// (one engine per node), so the events of three nodes in one process (the bench's r3)
/// can be told apart (16 bits of its address: two engines could share a tag, unlikely
/// with three); `scripts/timeline-report` splits the number again.
pub fn replica_group(engine: *const (), group: u64) -> u64 {
    ((engine as usize as u64 >> 4) & 0xffff) << 32 | (group & 0xffff_ffff)
}

/// Nanoseconds since the ring started (0 when recording is off): lets a caller put its
/// own instants on the timeline's clock.
pub fn now_ns() -> u64 {
    RING.get()
        .map_or(0, |r| r.start.elapsed().as_nanos() as u64)
}

/// The timeline's clock reading of `at` (0 when off or before the start).
pub fn ns_of(at: Instant) -> u64 {
    RING.get().map_or(0, |r| {
        at.saturating_duration_since(r.start).as_nanos() as u64
    })
}

/// Writes the events as CSV (`t_us,event,thread,group,value`, oldest first) to `path`;
/// returns how many. Recording goes on; call it after the load.
pub fn dump(path: &Path) -> std::io::Result<usize> {
    let Some(ring) = RING.get() else {
        return Ok(0);
    };
    let mut rows: Vec<(u64, u64, u64)> = ring
        .slots
        .iter()
        .map(|s| {
            (
                s[0].load(Ordering::Relaxed),
                s[1].load(Ordering::Relaxed),
                s[2].load(Ordering::Relaxed),
            )
        })
        .filter(|r| r.0 != 0)
        .collect();
    rows.sort_unstable_by_key(|r| r.0);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "t_us,event,thread,group,value")?;
    for (t, meta, value) in &rows {
        let name = Event::from_u8((meta >> 56) as u8).map_or("?", Event::name);
        writeln!(
            out,
            "{:.3},{name},{},{},{value}",
            (t - 1) as f64 / 1000.0,
            (meta >> 48) & 0xff,
            meta & 0xffff_ffff_ffff,
        )?;
    }
    out.flush()?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_records_nothing_then_on_records_in_order_and_dumps_csv() {
        // One test for the process-wide switch: the order matters. Other unit tests of
        // this crate run engines in the same process at the same time, and once the
        // timeline is on their engines record too: this test's events carry a group tag
        // of their own and only those rows are checked.
        const TAG: u64 = 0x5EED_7E57;
        record(Event::Mark, TAG, 1);
        assert!(!enabled());
        enable();
        record(Event::SyncStart, TAG, 3);
        record(Event::SyncEnd, TAG, 250);
        record(Event::LatePost, TAG, 12_000);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.csv");
        assert!(dump(&path).expect("dump") >= 3);
        let text = std::fs::read_to_string(&path).expect("read");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("t_us,event,thread,group,value"));
        let ours: Vec<&str> = lines
            .filter(|l| l.split(',').nth(3) == Some(&TAG.to_string()))
            .collect();
        assert_eq!(
            ours.len(),
            3,
            "the Mark recorded while off is not there: {ours:?}"
        );
        assert!(ours[0].contains(",sync_start,") && ours[0].ends_with(",3"));
        assert!(ours[1].contains(",sync_end,") && ours[1].ends_with(",250"));
        assert!(ours[2].contains(",late_post,") && ours[2].ends_with(",12000"));
        for e in 1..=30u8 {
            if let Some(ev) = Event::from_u8(e) {
                assert_eq!(ev as u8, e);
            }
        }
    }
}
