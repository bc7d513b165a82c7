//! The file system seam. The engine reaches files only through [`FileSystem`] and
//! [`File`], so tests can swap in [`crate::fault::FaultyFileSystem`] and prove that every
//! failed write, failed sync, short write and bit flip is caught.

use std::fmt::Debug;
use std::fs::{self, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

/// Directory operations the engine needs.
pub trait FileSystem: Send + Sync + Debug + 'static {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>>;
    /// Renames a file (atomically replacing `to`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file.
#[allow(clippy::len_without_is_empty)] // `len` is an I/O call; emptiness is never asked
pub trait File: Send + Sync + Debug {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes all of `bufs`, back to back, at `offset` (one group commit's records). The
    /// default gathers them into one buffer and calls [`File::write_all_at`] once, so a
    /// file system that counts or fails writes sees one write per call either way.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut all = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in bufs {
            all.extend_from_slice(b);
        }
        self.write_all_at(&all, offset)
    }
    /// Fills `buf` from `offset`; a short file is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (extending with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves blocks for `[0, len)` without writing them (they read as zeros) and sets
    /// the length to at least `len`. The default (and the fallback where the file system
    /// cannot) extends the file sparse with [`File::set_len`].
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    /// A read-only shared mapping of the whole file, or `None` to make readers go through
    /// [`File::read_exact_at`].
    fn map(&self) -> io::Result<Option<Mmap>>;
    /// The descriptor, for io_uring; `None` makes the engine use this trait's calls.
    fn raw_fd(&self) -> Option<RawFd>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFileSystem;

/// A real file.
#[derive(Debug)]
pub struct StdFile {
    file: fs::File,
}

impl FileSystem for StdFileSystem {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(path)?;
        Ok(Arc::new(StdFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }
}

impl File for StdFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut owned: Vec<IoSlice<'_>> = bufs.to_vec();
        let mut rest: &mut [IoSlice<'_>] = &mut owned;
        let mut at = offset;
        while !rest.is_empty() {
            let n = crate::io::retry_interrupted(|| self.file.write_vectored_at_once(rest, at))?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            at += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        // `write_all_at` already retries on EINTR (std does); fdatasync must too, or a
        // stop/continue signal would count as a failed sync and stop the engine.
        crate::io::retry_interrupted(|| self.file.sync_data())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    #[cfg(target_os = "linux")]
    fn allocate(&self, len: u64) -> io::Result<()> {
        let Ok(len_off) = libc::off_t::try_from(len) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        let r = crate::io::retry_interrupted(|| {
            match unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len_off) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.set_len(len),
            r => r,
        }
    }

    fn map(&self) -> io::Result<Option<Mmap>> {
        // SAFETY: segment files are only ever written by this engine, at offsets past every
        // record a reader can be pointed at (appends) or after the segment left the index
        // (recycling only happens with no reader holding the map). Readers check every
        // byte with a CRC before use, so a concurrent external writer yields an error,
        // not undefined values being trusted.
        let map = unsafe { Mmap::map(&self.file)? };
        Ok(Some(map))
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fdatasync, rename, directory sync.
pub(crate) fn write_file_atomic(fs: &dyn FileSystem, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let file = fs.open(&tmp, true)?;
    file.set_len(0)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()?;
    drop(file);
    fs.rename(&tmp, path)?;
    fs.sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads a whole file.
pub(crate) fn read_file(fs: &dyn FileSystem, path: &Path) -> io::Result<Vec<u8>> {
    let file = fs.open(path, false)?;
    let len = file.len()?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().expect("a file name").to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// One `pwritev` call.
trait PwritevOnce {
    fn write_vectored_at_once(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize>;
}

impl PwritevOnce for fs::File {
    fn write_vectored_at_once(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // At most IOV_MAX iovecs per call; the rest goes in the next round.
        let count = bufs.len().min(crate::config::GROUP_RECORDS_MAX) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the slices are valid
        // for reads for the duration of the call and the descriptor is ours.
        let n = unsafe {
            libc::pwritev(
                self.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                count,
                off,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
