//! The I/O backend of the committer: write a group (one vectored write) at an offset and
//! make it durable, started and finished separately so the next group can be gathered
//! meanwhile.
//! With io_uring the write is linked to an fdatasync and both go in one submission; the
//! thread then polls the completion queue for up to `sync_spin_us` before it sleeps, since
//! a halted vCPU here turns a 0.2 ms fdatasync into 4 ms. Without io_uring (blocked by
//! many container seccomp profiles) the same thread calls pwrite and fdatasync.

use std::io::{self, IoSlice};
use std::time::{Duration, Instant};

use crate::config::{IoBackend, IoMode};
use crate::fs::File;

/// Owned by the committer (whichever thread leads the group commit).
pub(crate) struct Writer {
    #[cfg(target_os = "linux")]
    ring: Option<io_uring::IoUring>,
    spin: Duration,
    /// The write + sync begun by [`Writer::start`], not yet finished.
    started: Option<Started>,
    /// `Config::slow_device_for_tests`: held after a start and before a finish.
    slow: Duration,
}

/// See [`Writer::started`].
enum Started {
    /// Submitted to the ring; this many completions to reap.
    #[cfg(target_os = "linux")]
    Uring { expected: u32 },
    /// Done at start (the syscall backend): its outcome.
    Done(io::Result<()>),
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("backend", &self.backend())
            .finish()
    }
}

impl Writer {
    /// Chooses the backend. `Err` only when io_uring was demanded and is missing.
    pub(crate) fn new(mode: IoMode, sync_spin_us: u32, slow: Duration) -> io::Result<Writer> {
        let spin = Duration::from_micros(sync_spin_us as u64);
        let writer = match mode {
            IoMode::Syscall => Ok(Writer::syscall(spin)),
            IoMode::Uring | IoMode::Auto => match Writer::uring(spin) {
                Ok(w) => Ok(w),
                Err(e) if mode == IoMode::Auto => {
                    tracing::warn!(error = %e, "io_uring unavailable; using pwrite+fdatasync");
                    Ok(Writer::syscall(spin))
                }
                Err(e) => Err(e),
            },
        };
        writer.map(|w| Writer { slow, ..w })
    }

    fn syscall(spin: Duration) -> Writer {
        Writer {
            #[cfg(target_os = "linux")]
            ring: None,
            spin,
            started: None,
            slow: Duration::ZERO,
        }
    }

    #[cfg(target_os = "linux")]
    fn uring(spin: Duration) -> io::Result<Writer> {
        let ring = io_uring::IoUring::new(8)?;
        // A ring can exist while the operations we need are filtered; probe them.
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(io_uring::opcode::Write::CODE)
            || !probe.is_supported(io_uring::opcode::Fsync::CODE)
        {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks write/fsync",
            ));
        }
        // Overlapped group commits free a group's iovec array right after submitting it.
        if !ring.params().is_feature_submit_stable() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_SUBMIT_STABLE",
            ));
        }
        Ok(Writer {
            ring: Some(ring),
            spin,
            started: None,
            slow: Duration::ZERO,
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn uring(_spin: Duration) -> io::Result<Writer> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring is Linux-only",
        ))
    }

    pub(crate) fn backend(&self) -> IoBackend {
        #[cfg(target_os = "linux")]
        if self.ring.is_some() {
            return IoBackend::Uring;
        }
        IoBackend::Syscall
    }

    /// Writes `bufs` back to back at `offset` without syncing (benchmark-only buffered
    /// mode).
    pub(crate) fn write_only(
        &mut self,
        file: &dyn File,
        bufs: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<()> {
        file.write_vectored_at(bufs, offset)
    }
}

impl Writer {
    /// Begins writing `bufs` back to back at `offset` (one vectored write: a group's
    /// records straight from their batches' buffers, at most
    /// [`crate::config::GROUP_RECORDS_MAX`] of them) and fdatasyncing the file, without
    /// waiting: with io_uring
    /// the write and the fdatasync run in the kernel while the caller gathers the next
    /// group; the syscall backend (and a file without a descriptor) does both now, on
    /// this thread. [`Writer::finish`] reports the outcome. One started write at a time.
    ///
    /// `overlap`: whether the caller has other work to do while the write and sync run
    /// (more batches queued behind this group). Without it the io_uring backend, too,
    /// writes and syncs here with plain syscalls: the ring's only gain is that overlap,
    /// and without it a round on the ring costs a hand-off to a kernel worker thread and
    /// a wake-up back, which made a lone writer ~10% slower per sync than
    /// pwritev + fdatasync on this machine class (`benches/RESULTS.md`, session 10). Both
    /// paths write the same bytes at the same offset, one round at a time.
    ///
    /// # Safety
    /// With io_uring the kernel reads the buffers `bufs` points at after this returns:
    /// they must stay valid and unchanged until [`Writer::finish`] has returned. (The
    /// `bufs` array itself may go: the ring copies it at submit.)
    /// Returns whether the round went to the ring.
    pub(crate) unsafe fn start(
        &mut self,
        file: &dyn File,
        bufs: &[IoSlice<'_>],
        offset: u64,
        overlap: bool,
    ) -> bool {
        assert!(self.started.is_none(), "one started write at a time");
        #[cfg(target_os = "linux")]
        if overlap && let (Some(ring), Some(fd)) = (self.ring.as_mut(), file.raw_fd()) {
            // SAFETY: passed on to our caller (see above).
            let r = unsafe { uring_submit(ring, fd, bufs, offset) };
            self.started = Some(match r {
                Ok(expected) => Started::Uring { expected },
                Err(e) => Started::Done(Err(e)),
            });
            self.hold();
            return true;
        }
        let r = if bufs.is_empty() {
            file.sync_data()
        } else {
            file.write_vectored_at(bufs, offset)
                .and_then(|()| file.sync_data())
        };
        self.started = Some(Started::Done(r));
        self.hold();
        false
    }

    /// A slow device, for tests (`Config::slow_device_for_tests`).
    fn hold(&self) {
        if !self.slow.is_zero() {
            std::thread::sleep(self.slow);
        }
    }

    /// Waits for the write and fdatasync begun by [`Writer::start`]. `bufs` and `offset`
    /// must be what was given to it: a short write is finished from them. On error nothing
    /// may be assumed about what reached the disk.
    pub(crate) fn finish(
        &mut self,
        file: &dyn File,
        bufs: &mut [IoSlice<'_>],
        offset: u64,
    ) -> io::Result<()> {
        self.hold();
        match self.started.take().expect("a started write") {
            Started::Done(r) => r,
            #[cfg(target_os = "linux")]
            Started::Uring { expected } => {
                let ring = self.ring.as_mut().expect("started on the ring");
                let (w, s) = uring_reap(ring, self.spin, expected)?;
                let total: usize = bufs.iter().map(|b| b.len()).sum();
                let mut rest: &mut [IoSlice<'_>] = bufs;
                if uring_round_done(w, s, &mut rest)? {
                    return Ok(());
                }
                // Short: finish the rest (and sync) the blocking way.
                let left: usize = rest.iter().map(|b| b.len()).sum();
                let fd = file.raw_fd().expect("started with a descriptor");
                uring_write_and_sync(ring, self.spin, fd, rest, offset + (total - left) as u64)
            }
        }
    }
}

#[cfg(target_os = "linux")]
const URING_WRITE: u64 = 1;
#[cfg(target_os = "linux")]
const URING_SYNC: u64 = 2;

/// Queues a vectored write of `rest` at `offset` linked to an fdatasync (just the
/// fdatasync if `rest` is empty) and submits both. Returns how many completions to reap.
///
/// # Safety
/// The buffers `rest` points at must stay valid and unchanged until both completions are
/// reaped. (The iovec array itself is read during the submit: the ring is only set up
/// with `IORING_FEAT_SUBMIT_STABLE`.)
#[cfg(target_os = "linux")]
unsafe fn uring_submit(
    ring: &mut io_uring::IoUring,
    fd: std::os::fd::RawFd,
    rest: &[IoSlice<'_>],
    offset: u64,
) -> io::Result<u32> {
    use io_uring::{opcode, squeue, types};
    let mut expected = 1;
    let sync = opcode::Fsync::new(types::Fd(fd))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(URING_SYNC);
    // SAFETY: the caller keeps the buffers alive until the completions are reaped;
    // `IoSlice` is ABI-compatible with `iovec` on Unix.
    unsafe {
        let mut sq = ring.submission();
        if !rest.is_empty() {
            let count = rest.len().min(crate::config::GROUP_RECORDS_MAX) as u32;
            let write =
                opcode::Writev::new(types::Fd(fd), rest.as_ptr().cast::<libc::iovec>(), count)
                    .offset(offset)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(URING_WRITE);
            sq.push(&write)
                .map_err(|_| io::Error::other("submission queue full"))?;
            expected = 2;
        }
        sq.push(&sync)
            .map_err(|_| io::Error::other("submission queue full"))?;
    }
    retry_interrupted(|| ring.submit())?;
    Ok(expected)
}

/// Reaps `expected` completions of [`uring_submit`], polling for up to `spin` before it
/// sleeps. Returns the write's and the sync's results (raw `cqe.result()`).
#[cfg(target_os = "linux")]
fn uring_reap(
    ring: &mut io_uring::IoUring,
    spin: Duration,
    expected: u32,
) -> io::Result<(Option<i32>, Option<i32>)> {
    let mut write_result: Option<i32> = None;
    let mut sync_result: Option<i32> = None;
    let mut seen = 0;
    let started = Instant::now();
    while seen < expected {
        let mut got = false;
        for cqe in ring.completion() {
            got = true;
            seen += 1;
            match cqe.user_data() {
                URING_WRITE => write_result = Some(cqe.result()),
                _ => sync_result = Some(cqe.result()),
            }
        }
        if seen >= expected {
            break;
        }
        if !got {
            if started.elapsed() < spin {
                std::hint::spin_loop();
            } else {
                // A signal (SIGSTOP/SIGCONT, a profiler) interrupts the wait, not the
                // I/O: the submissions are in the kernel and their completions still
                // come. Waiting again is right; failing the batch is not.
                retry_interrupted(|| ring.submit_and_wait(1))?;
            }
        }
    }
    Ok((write_result, sync_result))
}

/// Folds one round's completions into `written`/`rest`. `Ok(true)`: all written and
/// synced; `Ok(false)`: the write came back short, go round again.
#[cfg(target_os = "linux")]
fn uring_round_done(
    write_result: Option<i32>,
    sync_result: Option<i32>,
    rest: &mut &mut [IoSlice<'_>],
) -> io::Result<bool> {
    if let Some(res) = write_result {
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        if res == 0 && !rest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write wrote nothing",
            ));
        }
        IoSlice::advance_slices(rest, res as usize);
    }
    if !rest.is_empty() {
        // The linked sync was cancelled (or synced a partial write); go round again.
        return Ok(false);
    }
    let sync_res = sync_result.unwrap_or(-libc::ECANCELED);
    if sync_res < 0 {
        return Err(io::Error::from_raw_os_error(-sync_res));
    }
    Ok(true)
}

#[cfg(target_os = "linux")]
fn uring_write_and_sync(
    ring: &mut io_uring::IoUring,
    spin: Duration,
    fd: std::os::fd::RawFd,
    bufs: &mut [IoSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut rest: &mut [IoSlice<'_>] = bufs;
    // A regular-file write may come back short (a full disk, a signal); finish it with
    // further writes, then sync. Each round links the write to the sync.
    loop {
        let left: usize = rest.iter().map(|b| b.len()).sum();
        let at = offset + (total - left) as u64;
        // SAFETY: `rest`'s buffers are borrowed for this whole call, and both completions
        // are reaped below before it returns.
        let expected = unsafe { uring_submit(ring, fd, rest, at)? };
        let (w, s) = uring_reap(ring, spin, expected)?;
        if uring_round_done(w, s, &mut rest)? {
            return Ok(());
        }
    }
}

/// Runs `f` again while it fails with `EINTR`: an interrupted system call did not fail.
pub(crate) fn retry_interrupted<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn interrupted_calls_are_retried_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retry_interrupted(|| {
            calls += 1;
            if calls < 3 {
                Err(io::Error::from(io::ErrorKind::Interrupted))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.expect("third call succeeds"), 3);
        let mut calls = 0;
        let r: io::Result<()> = retry_interrupted(|| {
            calls += 1;
            Err(io::Error::from(io::ErrorKind::StorageFull))
        });
        assert_eq!(r.expect_err("fails").kind(), io::ErrorKind::StorageFull);
        assert_eq!(calls, 1);
    }
}
