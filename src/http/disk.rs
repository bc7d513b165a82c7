//! The node's disk usage for `status`, `/metrics` and the status page: the bytes under
//! its data directory and the free bytes of the file system holding it.
//!
//! What it owns: a bounded walk of the data directory. What it must not do: read file
//! contents, follow symbolic links, or walk without a bound (a data directory holds
//! segment files and finished media files; a walk of many thousand files must not stall
//! the HTTP port). Runs on a blocking thread (`tokio::task::spawn_blocking`).

use std::path::Path;

/// Most directory entries one walk looks at. Why: the segment files are a few hundred at
/// most, but media files grow with uploads; past this many the figure is reported as a
/// lower bound (`complete: false`) rather than making every status call slower.
pub const WALK_ENTRIES_MAX: usize = 100_000;

/// Disk usage of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes allocated on disk to the files under the data directory (`st_blocks × 512`,
    /// so preallocated segment files count in full and sparse holes do not).
    pub data_dir_bytes: u64,
    /// Bytes free for this user on the file system holding the data directory (`None`
    /// when `statvfs` failed).
    pub free_bytes: Option<u64>,
    /// False when the walk stopped at [`WALK_ENTRIES_MAX`] or could not read a directory:
    /// `data_dir_bytes` is then a lower bound.
    pub complete: bool,
}

/// Measures `dir` (blocking).
pub fn usage(dir: &Path) -> DiskUsage {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut complete = true;
    let mut seen = 0usize;
    let mut stack = vec![dir.to_path_buf()];
    'walk: while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            complete = false;
            continue;
        };
        for entry in entries {
            seen += 1;
            if seen > WALK_ENTRIES_MAX {
                complete = false;
                break 'walk;
            }
            let Ok(entry) = entry else {
                complete = false;
                continue;
            };
            // `symlink_metadata`: a link is counted as itself, never followed.
            let Ok(meta) = entry.path().symlink_metadata() else {
                complete = false;
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            }
            bytes += meta.blocks() * 512;
        }
    }
    DiskUsage {
        data_dir_bytes: bytes,
        free_bytes: crate::media::store::disk_free_bytes(dir),
        complete,
    }
}

/// `1.5 MiB`: bytes for people (binary units, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_measured_with_its_subdirectories() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::write(dir.path().join("b"), vec![2u8; 8 * 1024]).expect("write");
        let u = usage(dir.path());
        assert!(u.complete);
        assert!(
            u.data_dir_bytes >= 72 * 1024,
            "allocated bytes {} below the 72 KiB written",
            u.data_dir_bytes
        );
        assert!(u.free_bytes.is_some_and(|f| f > 0));
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
