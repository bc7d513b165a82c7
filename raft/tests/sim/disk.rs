//! The simulation's disk trace (issue 9): a file system that passes every call to the
//! node's `FaultyFileSystem` and writes each mutation (creation, write with a hash of its
//! bytes, fdatasync, size change, rename, removal, directory sync) to the run's trace. So
//! the trace holds every Raft append and vote as it reached the disk, byte for byte, in
//! order, and two runs of one seed must agree on them.
//!
//! What it owns: nothing but the recording. What it must not do: change what a call does,
//! or put anything in the trace that differs between runs of one seed (paths are named by
//! node and file name, never by the temporary directory).

use std::hash::{Hash, Hasher};
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use chatlog_raft::NodeId;
use chatlog_storage::{File, FileSystem};

use crate::net::SimNet;

/// A node's file system as the engine sees it in the simulation.
pub struct TracingFs {
    pub inner: Arc<dyn FileSystem>,
    pub node: NodeId,
    pub net: SimNet,
}

impl std::fmt::Debug for TracingFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TracingFs(node {})", self.node)
    }
}

fn name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| "?".into(), |n| n.to_string_lossy().into_owned())
}

fn outcome<T>(r: &io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("err {:?}", e.kind()),
    }
}

impl TracingFs {
    fn record(&self, what: String) {
        self.net.record(format!("disk {} {what}", self.node));
    }
}

impl FileSystem for TracingFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let r = self.inner.open(path, create);
        if create {
            self.record(format!("open+create {}: {}", name(path), outcome(&r)));
        }
        r.map(|inner| {
            Arc::new(TracingFile {
                inner,
                name: name(path),
                node: self.node,
                net: self.net.clone(),
            }) as Arc<dyn File>
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let r = self.inner.rename(from, to);
        self.record(format!(
            "rename {} {}: {}",
            name(from),
            name(to),
            outcome(&r)
        ));
        r
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let r = self.inner.remove(path);
        self.record(format!("remove {}: {}", name(path), outcome(&r)));
        r
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let r = self.inner.sync_dir(dir);
        self.record(format!("sync-dir: {}", outcome(&r)));
        r
    }
}

/// A file of [`TracingFs`].
struct TracingFile {
    inner: Arc<dyn File>,
    name: String,
    node: NodeId,
    net: SimNet,
}

impl std::fmt::Debug for TracingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TracingFile(node {} {})", self.node, self.name)
    }
}

impl TracingFile {
    fn record(&self, what: String) {
        self.net
            .record(format!("disk {} {} {what}", self.node, self.name));
    }
}

impl File for TracingFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.inner.write_all_at(buf, offset);
        // `DefaultHasher::new()` has fixed keys: equal bytes, equal hash, in every run.
        let mut h = std::hash::DefaultHasher::new();
        buf.hash(&mut h);
        self.record(format!(
            "write @{offset} {} bytes #{:016x}: {}",
            buf.len(),
            h.finish(),
            outcome(&r)
        ));
        r
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let r = self.inner.sync_data();
        self.record(format!("fdatasync: {}", outcome(&r)));
        r
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let r = self.inner.set_len(len);
        self.record(format!("set-len {len}: {}", outcome(&r)));
        r
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let r = self.inner.allocate(len);
        self.record(format!("allocate {len}: {}", outcome(&r)));
        r
    }

    fn map(&self) -> io::Result<Option<memmap2::Mmap>> {
        self.inner.map()
    }

    fn raw_fd(&self) -> Option<RawFd> {
        // Never io_uring: every write goes through this trait (and into the trace).
        None
    }
}
