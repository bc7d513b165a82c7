//! Engine configuration and the limits every buffer, batch and queue obeys.

use std::path::PathBuf;

use crate::format::{RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};

/// Largest raw (uncompressed) body of one write batch. One batch is one record on disk and
/// is decoded whole when read, so this bounds the memory a single read can pin; 16 MiB is
/// well above the 64 KiB–1 MiB batches group commit produces.
pub const WRITE_BATCH_BYTES_MAX: usize = 16 << 20;
/// Most operations in one write batch: the index names an operation with a `u16`.
pub const WRITE_BATCH_OPS_MAX: usize = u16::MAX as usize;
/// Longest per-log metadata key: keys are short names ("vote", "committed").
pub const META_KEY_BYTES_MAX: usize = 255;
/// Largest per-log metadata value: metadata is for small durable facts, not data; the
/// checkpoint carries all of it.
pub const META_VALUE_BYTES_MAX: usize = 64 << 10;
/// Smallest segment accepted: below this, rotation overhead dominates (tests use it to
/// exercise rotation and compaction quickly).
pub const SEGMENT_BYTES_MIN: u64 = 256 << 10;
/// Largest segment accepted: offsets inside a segment are `u32`.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;
/// Most records in one group commit: each record is one iovec of the group's vectored
/// write (records are written from the submitters' buffers, never copied into a group
/// buffer), and Linux takes at most `IOV_MAX` = 1,024 iovecs per write. The leader stops
/// gathering one record short of it, to leave room for a seal record.
pub const GROUP_RECORDS_MAX: usize = 1024;
/// Bytes kept free at the end of every segment for its seal record.
pub const SEAL_RESERVE_BYTES: u64 = 64;

const _: () = assert!(SEGMENT_BYTES_MIN > SEGMENT_HEADER_BYTES as u64 + SEAL_RESERVE_BYTES);
const _: () = assert!(SEAL_RESERVE_BYTES >= RECORD_HEADER_BYTES as u64 + 16);
const _: () = assert!(SEGMENT_BYTES_MAX <= u32::MAX as u64 + 1);

/// How writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when the kernel allows it, otherwise plain syscalls. The choice is logged
    /// and reported by [`crate::Engine::io_backend`].
    Auto,
    /// io_uring or fail to open.
    Uring,
    /// pwrite + fdatasync.
    Syscall,
}

/// The I/O backend an engine actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// A ring owned by the I/O thread: each group commit is a write linked to an fdatasync.
    Uring,
    /// pwrite followed by fdatasync.
    Syscall,
}

impl std::fmt::Display for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoBackend::Uring => "io_uring",
            IoBackend::Syscall => "pwrite+fdatasync",
        })
    }
}

/// Who runs the engine's work (issue 9, deterministic simulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineThreads {
    /// The engine's own threads: an I/O thread leads group commits of asynchronous
    /// submitters, a preparing thread keeps the next segment ready, a maintenance thread
    /// persists checkpoints and compacts on a timer. The production mode.
    Background,
    /// No threads at all (`storage/src/inline.rs`): every write is committed (written and
    /// fdatasync'd through the file system) on the caller's thread before `submit`
    /// returns, the next segment is prepared and a sealed segment's checkpoint persisted
    /// on that thread too, and compaction runs only when asked (`compact_now`); segment
    /// salts come from `salt_seed`, not the clock. For a simulator driving the engine
    /// from one thread, so that one seed replays one exact history. Not for servers: a
    /// tokio task that submits blocks in fdatasync.
    Inline {
        /// Seeds every segment's salt (mixed with the segment id).
        salt_seed: u64,
    },
}

/// How a fresh segment file gets its full size before it is used (recycled files already
/// have it). Whatever the method, the unused part of a segment reads as zeros (or, for a
/// recycled file, as records under an old salt), which recovery never takes for records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    /// Write zeros over the whole file and fdatasync it before use: appends then overwrite
    /// allocated blocks and their fdatasync commits no metadata. Costs one extra write of
    /// every byte (and its page-cache copy) ahead of the appends.
    ZeroFill,
    /// `fallocate(2)` the whole file (unwritten extents, no data written); where the file
    /// system cannot, the file is extended sparse. Each append's fdatasync also commits
    /// the conversion of the extents it wrote, as a growing file commits its size.
    Fallocate,
    /// Extend the file sparse (`ftruncate`): blocks are allocated by the appends.
    Sparse,
}

/// How much damage recovery accepts when it opens the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryMode {
    /// A torn tail (records of the last write, which was never acknowledged because its
    /// fdatasync did not finish) is cut off. Any other bad record stops the open with an
    /// error naming file and offset.
    TolerateTornTail,
    /// Even a torn tail is an error: for forensics, to open a data directory read as-is.
    Strict,
    /// As `TolerateTornTail`, and a bad record in the newest segment that later writes
    /// follow (damage inside synced data, issue 9) is cut too: the damaged record and
    /// everything after it in its segment are dropped, the segment is sealed at the
    /// damaged offset so the dropped bytes are never read again, and the cut is reported
    /// by [`crate::Engine::damage`]. For owners that can get what was dropped back from
    /// elsewhere (a Raft replica from its peers). Damage in an older segment, a truncated
    /// segment file or a missing one is cut too (issue 9, session 6; `crate::damage`):
    /// every log with entries in the lost range ends before it, the rest of the replay
    /// skips what no longer continues its log, and the cut is pinned by a write at open.
    /// The newest segment file cut short is still refused: nothing after it says what
    /// its lost tail held.
    CutDamagedTail,
}

/// Engine configuration. `Config::new(dir)` gives the defaults described on each field.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding segments, index files and the checkpoint. Created if missing.
    pub dir: PathBuf,
    /// Size of each preallocated segment file. Default 64 MiB.
    pub segment_bytes: u64,
    /// Which I/O backend to use. Default [`IoMode::Auto`].
    pub io_mode: IoMode,
    /// What recovery tolerates. Default [`RecoveryMode::TolerateTornTail`].
    pub recovery_mode: RecoveryMode,
    /// Batches whose raw body is at least this large are LZ4-compressed (kept only if that
    /// saves an eighth or more). 0 disables compression. Default 16 KiB.
    pub compression_bytes_min: usize,
    /// Bytes of records one group commit gathers before it writes and syncs. Default 4 MiB.
    pub group_commit_bytes_max: usize,
    /// Write batches that may wait for the I/O thread; submitters wait beyond it.
    /// Default 4096.
    pub queue_len_max: usize,
    /// Bytes of encoded batches that may wait for the I/O thread; submitters wait beyond
    /// it. Raised to one largest batch if set lower. Default 64 MiB.
    pub queue_bytes_max: usize,
    /// With io_uring, how long the I/O thread polls for the fdatasync completion before it
    /// sleeps in the kernel. Measured on the 2-vCPU machines this project runs on, a
    /// 2,000 µs spin cost 13–20% of durable throughput (the spinning thread starves the
    /// writers and the io_uring worker) and fdatasync stayed ~0.2 ms without it, so the
    /// default is 0 (off); see `benches/RESULTS.md`.
    pub sync_spin_us: u32,
    /// Segments whose live bytes are below this share of their size are rewritten by
    /// compaction. Default 0.5.
    pub compaction_live_ratio_max: f64,
    /// Compaction rewrites at most this many bytes per second. Default 32 MiB/s.
    pub compaction_bytes_per_sec: u64,
    /// How often the maintenance thread looks for segments to compact. Default 10 s.
    pub compaction_interval_ms: u64,
    /// How fresh segment files are sized before use. Default [`Preallocation::Fallocate`]
    /// (see `benches/RESULTS.md`, session 5: zero-filling cost a quarter of the CPU and an
    /// extra disk write per appended byte).
    pub preallocation: Preallocation,
    /// Dead segment files kept for reuse, so new segments need no preallocation. Default 4.
    pub recycle_segments_max: usize,
    /// Whether a group commit is followed by fdatasync. Default true. `false` exists only
    /// to measure the buffered write path against peers in benchmarks: writes are then
    /// reported "durable" after the write alone and a crash can lose them. Nothing in the
    /// server or CLI sets it.
    pub sync_on_commit: bool,
    /// Bytes of checked, decoded records kept for reads. A history page of one log
    /// touches records shared by many logs (a group commit holds entries of hundreds), so
    /// checking each once and reusing it saves a CRC of the whole record per entry.
    /// Default 64 MiB; 0 disables.
    pub read_cache_bytes: usize,
    /// Who runs the engine's work. Default [`EngineThreads::Background`].
    pub threads: EngineThreads,
    /// Whether a group commit, once the group before it is durable, takes in a few of the
    /// batches queued during that flight before it goes out (a group of fewer than 4
    /// records, at most 8 batches: `writer.rs`). It helps many async submitters that
    /// trickle small batches, as a node's Raft groups do (session 11: +15–30% through
    /// the gateway, ~3 Raft entries per fdatasync before); for a few blocking writers
    /// with full queues (`append_durable_8w`) it measured no better and perhaps worse,
    /// since the batches are placed before the flight's callbacks run. Default false;
    /// `chatlog_raft::node` turns it on.
    pub top_up_groups: bool,
    /// Fault injection for tests (a slow disk): each group commit's write is held this
    /// long after it started, and again before its completion is awaited. Default zero;
    /// nothing in the server sets it.
    #[doc(hidden)]
    pub slow_device_for_tests: std::time::Duration,
}

impl Config {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            io_mode: IoMode::Auto,
            recovery_mode: RecoveryMode::TolerateTornTail,
            compression_bytes_min: 16 << 10,
            group_commit_bytes_max: 4 << 20,
            queue_len_max: 4096,
            queue_bytes_max: 64 << 20,
            sync_spin_us: 0,
            compaction_live_ratio_max: 0.5,
            compaction_bytes_per_sec: 32 << 20,
            compaction_interval_ms: 10_000,
            preallocation: Preallocation::Fallocate,
            recycle_segments_max: 4,
            sync_on_commit: true,
            read_cache_bytes: 64 << 20,
            threads: EngineThreads::Background,
            top_up_groups: false,
            slow_device_for_tests: std::time::Duration::ZERO,
        }
    }

    /// Largest raw write batch this configuration accepts: it must fit an empty segment.
    pub fn write_batch_bytes_max(&self) -> usize {
        let room = self.segment_bytes
            - SEGMENT_HEADER_BYTES as u64
            - SEAL_RESERVE_BYTES
            - RECORD_HEADER_BYTES as u64
            - 8;
        (room.min(WRITE_BATCH_BYTES_MAX as u64)) as usize
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let fail = |m: String| Err(crate::Error::Config(m));
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return fail(format!(
                "segment_bytes {} is outside [{SEGMENT_BYTES_MIN}, {SEGMENT_BYTES_MAX}]",
                self.segment_bytes
            ));
        }
        if !self.segment_bytes.is_multiple_of(4096) {
            return fail(format!(
                "segment_bytes {} is not a multiple of 4096",
                self.segment_bytes
            ));
        }
        if self.queue_len_max == 0 {
            return fail("queue_len_max must be at least 1".into());
        }
        if self.group_commit_bytes_max == 0 {
            return fail("group_commit_bytes_max must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.compaction_live_ratio_max) {
            return fail("compaction_live_ratio_max must be within [0, 1]".into());
        }
        Ok(())
    }
}
