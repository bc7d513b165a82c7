//! A fault-injecting file system for tests: it passes every call to the real file system
//! unless a [`FaultPlan`] says the next write, sync or read should fail, come up short or
//! return flipped bits. Reads always go through `read_exact_at` (it offers no mmap), so
//! injected bit flips reach the engine's checks exactly as rot on a disk would.
//!
//! Power cuts ([`FaultyFileSystem::with_power_cuts`]). In this mode the file system
//! remembers, per file, everything written since that file's last `sync_data` (an undo
//! log of the bytes each write replaced and the length before it), and, per directory,
//! every creation, rename and removal since that directory's last `sync_dir`.
//! [`FaultyFileSystem::cut_power`] then does what a power cut may do to a real disk: it
//! drops every unsynced write (or, torn, keeps a seeded prefix of them, cut at any byte),
//! undoes unsynced length changes, removes files whose creation was not made durable,
//! and undoes unsynced renames and removals. Every handle opened before the cut (and the
//! `FaultyFileSystem` value that opened them) fails every later call with EIO, as a dead
//! machine would; [`FaultyFileSystem::reboot`] gives the handle to open the survivors with.
//!
//! What it owns: the fault plan and the power-cut bookkeeping. What it must not do: change
//! what a call does when no fault is armed and power cuts are off (the engine's other
//! tests run through it), or let a handle from before a cut touch a file after it.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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

/// How much of the unsynced data a power cut keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCut {
    /// Every byte written since the last sync of its file is lost.
    DropUnsynced,
    /// A seeded prefix of each file's unsynced writes survives, cut at any byte (a torn
    /// write); the rest is lost.
    Torn,
    /// Each 512-byte sector of each unsynced write survives or not on its own (seeded):
    /// a disk that persisted a write's sectors out of order.
    Scrambled,
}

/// The sector size `PowerCut::Scrambled` keeps or drops.
pub const POWER_CUT_SECTOR_BYTES: u64 = 512;

/// What a power cut undid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Files that had unsynced writes or length changes.
    pub files_reverted: u64,
    /// Unsynced bytes lost.
    pub bytes_dropped: u64,
    /// Unsynced bytes that survived (torn cuts only).
    pub bytes_kept: u64,
    /// Unsynced creations, renames and removals undone.
    pub directory_ops_undone: u64,
}

/// Marks the name a removal parks a file under until its directory is synced; such
/// names are hidden from [`FileSystem::list`].
const REMOVED_MARK: &str = ".powercut-removed-";

/// One unsynced change to a file's data or length, with what it replaced.
#[derive(Debug)]
enum Undo {
    /// `len` bytes written at `offset`; `old` are the bytes they replaced (only those
    /// that were inside the file), `old_len` the file's length before.
    Write {
        offset: u64,
        len: u64,
        old: Vec<u8>,
        old_len: u64,
    },
    /// The length was set; `cut` holds the bytes a shrink removed.
    SetLen { old_len: u64, cut: Vec<u8> },
}

/// One unsynced directory change.
#[derive(Debug)]
enum DirOp {
    /// A file was created at `path`.
    Created { path: PathBuf },
    /// `from` was renamed to `to`; the file `to` replaced waits at `displaced`.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        displaced: Option<PathBuf>,
    },
    /// `path` was removed; the file waits at `parked` until the directory is synced.
    Removed { path: PathBuf, parked: PathBuf },
}

impl DirOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            DirOp::Created { path } | DirOp::Removed { path, .. } => path.parent(),
            DirOp::Renamed { to, .. } => to.parent(),
        }
    }
}

/// Power-cut bookkeeping shared by every handle of one simulated disk.
#[derive(Debug)]
struct Power {
    /// Bumped by every cut; handles of an older boot fail every call.
    boot: u64,
    /// File identity (an inode of sorts) by its current path.
    ids: HashMap<PathBuf, u64>,
    next_id: u64,
    /// Unsynced changes per file identity, oldest first.
    undo: HashMap<u64, Vec<Undo>>,
    /// Unsynced directory changes, oldest first.
    dir_ops: Vec<DirOp>,
    parked: u64,
    /// splitmix64 state for torn cuts.
    rng: u64,
    /// An armed cut: the power goes at the write or sync after this many more.
    armed: Option<(u64, PowerCut)>,
    /// What the last cut undid.
    last_cut: Option<PowerCutReport>,
}

impl Power {
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn id_of(&mut self, path: &Path) -> u64 {
        if let Some(id) = self.ids.get(path) {
            return *id;
        }
        self.next_id += 1;
        self.ids.insert(path.to_path_buf(), self.next_id);
        self.next_id
    }

    fn path_of(&self, id: u64) -> Option<PathBuf> {
        self.ids
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(p, _)| p.clone())
    }

    fn park_name(&mut self, path: &Path) -> PathBuf {
        self.parked += 1;
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!("{REMOVED_MARK}{}", self.parked));
        path.with_file_name(name)
    }
}

fn dead() -> io::Error {
    io::Error::other("injected power cut: this handle's machine lost power")
}

/// The fault-injecting file system.
#[derive(Debug, Clone, Default)]
pub struct FaultyFileSystem {
    inner: StdFileSystem,
    plan: Arc<FaultPlan>,
    /// `Some` in power-cut mode, with the boot this value belongs to.
    power: Option<(Arc<Mutex<Power>>, u64)>,
}

impl FaultyFileSystem {
    pub fn new() -> FaultyFileSystem {
        FaultyFileSystem::default()
    }

    /// A file system that tracks unsynced writes so [`FaultyFileSystem::cut_power`] can
    /// drop them; `seed` decides how much of them torn cuts keep.
    pub fn with_power_cuts(seed: u64) -> FaultyFileSystem {
        FaultyFileSystem {
            power: Some((
                Arc::new(Mutex::new(Power {
                    boot: 0,
                    ids: HashMap::new(),
                    next_id: 0,
                    undo: HashMap::new(),
                    dir_ops: Vec::new(),
                    parked: 0,
                    rng: seed,
                    armed: None,
                    last_cut: None,
                })),
                0,
            )),
            ..FaultyFileSystem::default()
        }
    }

    /// The plan to arm faults with.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    /// The power state, if this value is still alive: `Err` after a cut.
    fn power(&self) -> io::Result<Option<MutexGuard<'_, Power>>> {
        match &self.power {
            None => Ok(None),
            Some((power, boot)) => {
                let guard = power.lock().unwrap_or_else(|p| p.into_inner());
                if guard.boot != *boot {
                    return Err(dead());
                }
                Ok(Some(guard))
            }
        }
    }

    /// Cuts the power: undoes every unsynced change as described in the module docs and
    /// kills every handle opened so far. Panics outside power-cut mode.
    pub fn cut_power(&self, how: PowerCut) -> io::Result<PowerCutReport> {
        let mut p = self.power_state();
        cut(&mut p, how)
    }

    /// Arms a cut at an I/O call: the power goes just before the write or fdatasync
    /// after `calls` more of them (on any file), which then fails like every later call.
    /// Lands cuts between a write and its sync, where a cut from outside rarely does.
    pub fn cut_power_after(&self, calls: u64, how: PowerCut) {
        self.power_state().armed = Some((calls, how));
    }

    /// What the last cut undid (`None` before any), and whether a cut is still armed.
    pub fn last_cut(&self) -> (Option<PowerCutReport>, bool) {
        let p = self.power_state();
        (p.last_cut.clone(), p.armed.is_some())
    }

    fn power_state(&self) -> MutexGuard<'_, Power> {
        let (power, _) = self
            .power
            .as_ref()
            .expect("power cuts need FaultyFileSystem::with_power_cuts");
        power.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file system as the next boot sees it: a value whose handles work again
    /// (sharing the same disk and fault plan). Call after [`FaultyFileSystem::cut_power`].
    pub fn reboot(&self) -> FaultyFileSystem {
        let mut next = self.clone();
        if let Some((power, boot)) = &mut next.power {
            *boot = power.lock().unwrap_or_else(|e| e.into_inner()).boot;
        }
        next
    }
}

/// Counts one write or sync against an armed cut; `Some` when the power goes now.
fn armed_cut_fires(p: &mut Power) -> Option<PowerCut> {
    let (left, how) = p.armed?;
    if left > 0 {
        p.armed = Some((left - 1, how));
        return None;
    }
    Some(how)
}

/// The cut itself (see [`FaultyFileSystem::cut_power`]).
fn cut(p: &mut Power, how: PowerCut) -> io::Result<PowerCutReport> {
    p.boot += 1;
    p.armed = None;
    let mut report = PowerCutReport::default();
    // File data first, on each file's current name (a removed file is still parked).
    let undo = std::mem::take(&mut p.undo);
    let mut ids: Vec<u64> = undo.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let ops = &undo[&id];
        if ops.is_empty() {
            continue;
        }
        let Some(path) = p.path_of(id) else {
            continue;
        };
        report.files_reverted += 1;
        let written: u64 = ops
            .iter()
            .map(|u| match u {
                Undo::Write { len, .. } => *len,
                Undo::SetLen { .. } => 0,
            })
            .sum();
        let keep = match how {
            PowerCut::DropUnsynced => 0,
            PowerCut::Torn => p.next_random() % (written + 1),
            PowerCut::Scrambled => {
                let kept = scramble_file(&path, ops, &mut || p.next_random())?;
                report.bytes_kept += kept;
                report.bytes_dropped += written - kept;
                continue;
            }
        };
        report.bytes_kept += keep;
        report.bytes_dropped += written - keep;
        revert_file(&path, ops, keep)?;
    }
    // Then names, newest change first.
    let ops = std::mem::take(&mut p.dir_ops);
    for op in ops.into_iter().rev() {
        report.directory_ops_undone += 1;
        match op {
            DirOp::Created { path } => {
                p.ids.remove(&path);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            DirOp::Renamed {
                from,
                to,
                displaced,
            } => {
                std::fs::rename(&to, &from)?;
                if let Some(id) = p.ids.remove(&to) {
                    p.ids.insert(from, id);
                }
                if let Some(parked) = displaced {
                    std::fs::rename(&parked, &to)?;
                    if let Some(id) = p.ids.remove(&parked) {
                        p.ids.insert(to, id);
                    }
                }
            }
            DirOp::Removed { path, parked } => {
                std::fs::rename(&parked, &path)?;
                if let Some(id) = p.ids.remove(&parked) {
                    p.ids.insert(path, id);
                }
            }
        }
    }
    p.last_cut = Some(report.clone());
    Ok(report)
}

/// Undoes `ops` (oldest first, newest undone first) sector by sector: each sector of each
/// write is kept or restored on a coin flip; a write that grew the file keeps its length
/// only if its last sector is kept; length changes are undone. Returns the bytes kept.
fn scramble_file(path: &Path, ops: &[Undo], coin: &mut dyn FnMut() -> u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut kept = 0u64;
    for op in ops.iter().rev() {
        match op {
            Undo::Write {
                offset,
                len,
                old,
                old_len,
            } => {
                let end = offset + len;
                let mut at = *offset;
                let mut last_kept = false;
                while at < end {
                    let next = ((at / POWER_CUT_SECTOR_BYTES) + 1) * POWER_CUT_SECTOR_BYTES;
                    let next = next.min(end);
                    last_kept = coin().is_multiple_of(2);
                    if last_kept {
                        kept += next - at;
                    } else {
                        let old_end = offset + old.len() as u64;
                        if at < old_end {
                            let from = (at - offset) as usize;
                            let to = (next.min(old_end) - offset) as usize;
                            file.write_all_at(&old[from..to], at)?;
                        }
                    }
                    at = next;
                }
                let current = file.metadata()?.len();
                if !last_kept && end > *old_len && current > *old_len {
                    file.set_len((*old_len).max(*offset).min(current))?;
                }
            }
            Undo::SetLen { old_len, cut } => {
                let current = file.metadata()?.len();
                file.set_len(*old_len)?;
                if !cut.is_empty() && current < *old_len {
                    file.write_all_at(cut, current)?;
                }
            }
        }
    }
    file.sync_all()?;
    Ok(kept)
}

/// Undoes `ops` (oldest first) on the file at `path`, keeping the first `keep` bytes of
/// the unsynced writes in order.
fn revert_file(path: &Path, ops: &[Undo], keep: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    // Which writes survive: whole ones up to `keep` bytes, then a prefix of one.
    let mut budget = keep;
    let mut kept = Vec::with_capacity(ops.len());
    for op in ops {
        let k = match op {
            Undo::Write { len, .. } => {
                let k = (*len).min(budget);
                budget -= k;
                k
            }
            // A length change survives only with every write before and after it.
            Undo::SetLen { .. } => u64::from(budget > 0),
        };
        kept.push(k);
    }
    for (op, k) in ops.iter().zip(kept).rev() {
        match op {
            Undo::Write {
                offset,
                len,
                old,
                old_len,
            } => {
                if k == *len {
                    continue;
                }
                let current = file.metadata()?.len();
                // Old bytes past the kept prefix come back; bytes the write appended
                // beyond the old length go (unless the kept prefix reaches there).
                let from = *offset + k;
                let old_end = *offset + old.len() as u64;
                if from < old_end {
                    file.write_all_at(&old[(k as usize)..], from)?;
                }
                let len_after = (*old_len).max(from).min(current.max(*old_len));
                if len_after < current {
                    file.set_len(len_after)?;
                }
            }
            Undo::SetLen { old_len, cut } => {
                if k == 1 {
                    continue;
                }
                let current = file.metadata()?.len();
                file.set_len(*old_len)?;
                if !cut.is_empty() && current < *old_len {
                    file.write_all_at(cut, current)?;
                }
            }
        }
    }
    file.sync_all()
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn File>,
    plan: Arc<FaultPlan>,
    /// In power-cut mode: the disk, this handle's boot and its file's identity.
    power: Option<(Arc<Mutex<Power>>, u64, u64)>,
}

impl FaultyFile {
    fn power(&self) -> io::Result<Option<(MutexGuard<'_, Power>, u64)>> {
        match &self.power {
            None => Ok(None),
            Some((power, boot, id)) => {
                let guard = power.lock().unwrap_or_else(|p| p.into_inner());
                if guard.boot != *boot {
                    return Err(dead());
                }
                Ok(Some((guard, *id)))
            }
        }
    }

    fn write_tracked(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some((mut p, id)) = self.power()? else {
            return self.inner.write_all_at(buf, offset);
        };
        let fires = armed_cut_fires(&mut p);
        if fires == Some(PowerCut::DropUnsynced) {
            cut(&mut p, PowerCut::DropUnsynced)?;
            return Err(dead());
        }
        let old_len = self.inner.len()?;
        let old_end = (offset + buf.len() as u64).min(old_len);
        let mut old = vec![0u8; old_end.saturating_sub(offset) as usize];
        if !old.is_empty() {
            self.inner.read_exact_at(&mut old, offset)?;
        }
        p.undo.entry(id).or_default().push(Undo::Write {
            offset,
            len: buf.len() as u64,
            old,
            old_len,
        });
        self.inner.write_all_at(buf, offset)?;
        if let Some(how) = fires {
            // Torn: the power went during this write, so a prefix of it may be there.
            cut(&mut p, how)?;
            return Err(dead());
        }
        Ok(())
    }
}

impl FileSystem for FaultyFileSystem {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Directories themselves are treated as durable once made.
        self.power()?;
        self.inner.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let power = self.power()?;
        let mut names = self.inner.list(dir)?;
        if power.is_some() {
            names.retain(|n| !n.contains(REMOVED_MARK));
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let Some(mut p) = self.power()? else {
            let inner = self.inner.open(path, create)?;
            return Ok(Arc::new(FaultyFile {
                inner,
                plan: self.plan.clone(),
                power: None,
            }));
        };
        let existed = path.exists();
        let inner = self.inner.open(path, create)?;
        if !existed {
            p.dir_ops.push(DirOp::Created {
                path: path.to_path_buf(),
            });
            // A new file under a name an old (dead) identity had: a fresh identity.
            p.ids.remove(path);
        }
        let id = p.id_of(path);
        let (power, boot) = self.power.as_ref().expect("power-cut mode");
        Ok(Arc::new(FaultyFile {
            inner,
            plan: self.plan.clone(),
            power: Some((Arc::clone(power), *boot, id)),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let Some(mut p) = self.power()? else {
            return self.inner.rename(from, to);
        };
        let displaced = if to.exists() {
            let parked = p.park_name(to);
            self.inner.rename(to, &parked)?;
            if let Some(id) = p.ids.remove(to) {
                p.ids.insert(parked.clone(), id);
            }
            Some(parked)
        } else {
            None
        };
        self.inner.rename(from, to)?;
        let id = p.id_of(from);
        p.ids.remove(from);
        p.ids.insert(to.to_path_buf(), id);
        p.dir_ops.push(DirOp::Renamed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            displaced,
        });
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let Some(mut p) = self.power()? else {
            return self.inner.remove(path);
        };
        // Parked, not deleted, until the directory is synced.
        let parked = p.park_name(path);
        self.inner.rename(path, &parked)?;
        let id = p.id_of(path);
        p.ids.remove(path);
        p.ids.insert(parked.clone(), id);
        p.dir_ops.push(DirOp::Removed {
            path: path.to_path_buf(),
            parked,
        });
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let Some(mut p) = self.power()? else {
            return self.inner.sync_dir(dir);
        };
        self.inner.sync_dir(dir)?;
        let ops = std::mem::take(&mut p.dir_ops);
        for op in ops {
            if op.dir() != Some(dir) {
                p.dir_ops.push(op);
                continue;
            }
            // Durable now; parked files really go.
            let parked = match op {
                DirOp::Removed { parked, .. } => Some(parked),
                DirOp::Renamed {
                    displaced: Some(parked),
                    ..
                } => Some(parked),
                _ => None,
            };
            if let Some(parked) = parked {
                if let Some(id) = p.ids.remove(&parked) {
                    p.undo.remove(&id);
                }
                self.inner.remove(&parked)?;
            }
        }
        Ok(())
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
            self.write_tracked(&buf[..buf.len() / 2], offset)?;
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "injected short write",
            ));
        }
        self.write_tracked(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.plan.reads.fetch_add(1, Ordering::SeqCst);
        let _alive = self.power()?;
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
        let Some((mut p, id)) = self.power()? else {
            return self.inner.sync_data();
        };
        if let Some(how) = armed_cut_fires(&mut p) {
            cut(&mut p, how)?;
            return Err(dead());
        }
        // Under the lock: a cut happens entirely before or entirely after this sync.
        self.inner.sync_data()?;
        p.undo.remove(&id);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let _alive = self.power()?;
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let Some((mut p, id)) = self.power()? else {
            return self.inner.set_len(len);
        };
        let old_len = self.inner.len()?;
        let mut cut = vec![0u8; old_len.saturating_sub(len) as usize];
        if !cut.is_empty() {
            self.inner.read_exact_at(&mut cut, len)?;
        }
        p.undo
            .entry(id)
            .or_default()
            .push(Undo::SetLen { old_len, cut });
        self.inner.set_len(len)
    }

    fn map(&self) -> io::Result<Option<Mmap>> {
        Ok(None)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}
