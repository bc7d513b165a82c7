//! A fault-injecting file system for tests: it passes every call to the real file system
//! unless a [`FaultPlan`] says the next write, sync or read should fail, come up short or
//! return flipped bits. Reads always go through `read_exact_at` (it offers no mmap), so
//! injected bit flips reach the engine's checks exactly as rot on a disk would.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;

use crate::fs::{File, FileSystem, StdFileSystem};

/// What to break, counted in calls from now. `u64::MAX` (the default) means never.
#[derive(Debug)]
pub struct FaultPlan {
    /// Fail the write after this many more writes succeed (with EIO).
    pub fail_write_after: AtomicU64,
    /// Like `fail_write_after`, but the write reports ENOSPC (a full disk).
    pub no_space_after: AtomicU64,
    /// Write only the first half of the buffer of the write after this many, then fail.
    pub short_write_after: AtomicU64,
    /// Fail the fdatasync after this many more succeed.
    pub fail_sync_after: AtomicU64,
    /// Flip one bit in the data returned by the read after this many more reads.
    pub flip_read_after: AtomicU64,
    /// Calls seen, for tests that want to aim at "the next one".
    pub writes: AtomicU64,
    pub syncs: AtomicU64,
    pub reads: AtomicU64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan {
            fail_write_after: AtomicU64::new(u64::MAX),
            no_space_after: AtomicU64::new(u64::MAX),
            short_write_after: AtomicU64::new(u64::MAX),
            fail_sync_after: AtomicU64::new(u64::MAX),
            flip_read_after: AtomicU64::new(u64::MAX),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }
}

/// Decrements a countdown; true when it fires (once).
fn fires(counter: &AtomicU64) -> bool {
    let mut current = counter.load(Ordering::SeqCst);
    loop {
        if current == u64::MAX {
            return false;
        }
        let next = if current == 0 { u64::MAX } else { current - 1 };
        match counter.compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return current == 0,
            Err(seen) => current = seen,
        }
    }
}

/// The fault-injecting file system.
#[derive(Debug, Clone, Default)]
pub struct FaultyFileSystem {
    inner: StdFileSystem,
    plan: Arc<FaultPlan>,
}

impl FaultyFileSystem {
    pub fn new() -> FaultyFileSystem {
        FaultyFileSystem::default()
    }

    /// The plan to arm faults with.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn File>,
    plan: Arc<FaultPlan>,
}

impl FileSystem for FaultyFileSystem {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let inner = self.inner.open(path, create)?;
        Ok(Arc::new(FaultyFile {
            inner,
            plan: self.plan.clone(),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

impl File for FaultyFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.plan.writes.fetch_add(1, Ordering::SeqCst);
        if fires(&self.plan.fail_write_after) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if fires(&self.plan.no_space_after) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if fires(&self.plan.short_write_after) {
            self.inner.write_all_at(&buf[..buf.len() / 2], offset)?;
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "injected short write",
            ));
        }
        self.inner.write_all_at(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.plan.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_exact_at(buf, offset)?;
        if !buf.is_empty() && fires(&self.plan.flip_read_after) {
            let at = buf.len() / 2;
            buf[at] ^= 0x04;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.plan.syncs.fetch_add(1, Ordering::SeqCst);
        if fires(&self.plan.fail_sync_after) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn map(&self) -> io::Result<Option<Mmap>> {
        Ok(None)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}
