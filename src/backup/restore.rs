//! `chatlog restore --from DIR --data-dir D --node-id N`: a fresh node's data directory
//! built from a backup (`chatlog admin backup`), offline.
//!
//! What it owns: checking a whole backup before anything is written — the manifest is
//! there (no manifest: a partial backup), every file it lists is there with its size and
//! SHA-256, every group file reads to its trailer with every CRC and entry index right,
//! every media file's header CRC and content SHA-256 match — and then writing, per group
//! this node is a member of, the Raft log entries at their indexes, the checkpoint, the
//! purge mark, the committed mark (the backup's index A) and a vote for the leader that
//! wrote entry A, and copying the media files into the media store. What it must not do:
//! write into a directory that holds anything, or start a node (`chatlog serve` with
//! the same node ids, `--initial-cluster` and `--groups` as the backed-up cluster does
//! that; openraft re-applies (checkpoint, A] as after a restart).
//!
//! Why a vote: a restored log holds entries of term T; a replica whose vote is older
//! than its log's last term would campaign at a lower term and append entries whose
//! leader id goes backwards. A committed vote for entry A's leader is exactly what a
//! follower that accepted entry A holds; the group elects a new leader at T + 1.

use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chatlog_raft::types::{LogId, Vote};
use chatlog_raft::{codec, ids};
use chatlog_storage::{Engine, WriteBatch};
use clap::Args;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    FORMAT_VERSION, GroupFileError, GroupFileSummary, MANIFEST_BYTES_MAX, MANIFEST_FORMAT,
    MANIFEST_NAME, check_media_file, hex_of, is_media_name, read_group_file,
};
use crate::cli::CliError;

/// Flags of `chatlog restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup directory (`chatlog admin backup --out DIR`).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// The new node's data directory (created; must not exist or be empty).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The node this data directory is for: it receives the groups whose membership
    /// names it (restore every node of the backed-up cluster with its own id).
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// Segment size in MiB of the new data directory (as `chatlog serve --segment-mb`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=2048))]
    pub segment_mb: Option<u64>,
    /// Only check the backup (every file, every checksum); write nothing.
    #[arg(long)]
    pub check_only: bool,
    /// Print the result as JSON: {"groups": N, "entries": N, "media": N, "bytes": N,
    /// "elapsed_ms": N, "checked_only": BOOL}.
    #[arg(long)]
    pub json: bool,
}

fn fail(code: &str, message: impl Into<String>) -> CliError {
    format!("{code}: {}", message.into()).into()
}

/// A file the manifest lists.
struct Listed {
    file: String,
    bytes: u64,
    sha256: String,
}

fn listed(row: &Value, what: &str) -> Result<Listed, CliError> {
    let file = row["file"]
        .as_str()
        .ok_or_else(|| fail("BAD_BACKUP", format!("manifest: {what} without a file")))?;
    let safe = Path::new(file)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !safe {
        return Err(fail(
            "BAD_BACKUP",
            format!("manifest: {what}: file {file:?} is outside the backup directory"),
        ));
    }
    Ok(Listed {
        file: file.to_string(),
        bytes: row["bytes"]
            .as_u64()
            .ok_or_else(|| fail("BAD_BACKUP", format!("manifest: {what} without bytes")))?,
        sha256: row["sha256"]
            .as_str()
            .ok_or_else(|| fail("BAD_BACKUP", format!("manifest: {what} without sha256")))?
            .to_string(),
    })
}

/// Reads through `inner`, hashing and counting.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn open_listed(dir: &Path, l: &Listed) -> Result<std::fs::File, CliError> {
    let path = dir.join(&l.file);
    match std::fs::File::open(&path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(fail(
            "BAD_BACKUP",
            format!(
                "{} is missing: the backup is incomplete ({} lists it)",
                l.file, MANIFEST_NAME
            ),
        )),
        Err(e) => Err(fail("IO", format!("{}: {e}", path.display()))),
    }
}

fn check_sum(l: &Listed, bytes: u64, sha: Sha256) -> Result<(), CliError> {
    let got = hex_of(&sha.finalize());
    if bytes != l.bytes || got != l.sha256 {
        return Err(fail(
            "BAD_BACKUP",
            format!(
                "{} is damaged: {bytes} bytes with SHA-256 {got}, the manifest says {} bytes \
                 with SHA-256 {}",
                l.file, l.bytes, l.sha256
            ),
        ));
    }
    Ok(())
}

/// Reads one group file through `on_entry`, checking it against the manifest too.
fn read_group(
    dir: &Path,
    l: &Listed,
    on_checkpoint: impl FnMut(&[u8]) -> Result<(), GroupFileError>,
    on_entry: impl FnMut(u64, &[u8]) -> Result<(), GroupFileError>,
) -> Result<GroupFileSummary, CliError> {
    let f = open_listed(dir, l)?;
    let mut r = Hashing {
        inner: BufReader::with_capacity(1 << 20, f),
        sha: Sha256::new(),
        bytes: 0,
    };
    let summary = read_group_file(&mut r, on_checkpoint, on_entry)
        .map_err(|e| fail("BAD_BACKUP", format!("{} is damaged: {e}", l.file)));
    // A size or hash mismatch is the clearer message when both fail.
    check_sum(l, r.bytes, r.sha)?;
    summary
}

/// Runs `chatlog restore`.
pub fn run(args: RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let dir = &args.from;
    // 1. The manifest: its absence means the backup never finished.
    let manifest_path = dir.join(MANIFEST_NAME);
    let manifest_len = match std::fs::metadata(&manifest_path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(
                "BAD_BACKUP",
                format!(
                    "{} is missing: {} is not a backup, or a backup that did not finish",
                    MANIFEST_NAME,
                    dir.display()
                ),
            ));
        }
        Err(e) => return Err(fail("IO", format!("{}: {e}", manifest_path.display()))),
    };
    if manifest_len > MANIFEST_BYTES_MAX {
        return Err(fail(
            "BAD_BACKUP",
            format!("{MANIFEST_NAME} is {manifest_len} bytes, over {MANIFEST_BYTES_MAX}"),
        ));
    }
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .map_err(|e| fail("IO", format!("{}: {e}", manifest_path.display())))?,
    )
    .map_err(|e| fail("BAD_BACKUP", format!("{MANIFEST_NAME} is damaged: {e}")))?;
    if manifest["format"] != MANIFEST_FORMAT || manifest["version"] != FORMAT_VERSION {
        return Err(fail(
            "BAD_BACKUP",
            format!(
                "{MANIFEST_NAME}: format {} version {}, this build reads {MANIFEST_FORMAT} \
                 version {FORMAT_VERSION}",
                manifest["format"], manifest["version"]
            ),
        ));
    }
    let group_rows = manifest["groups"].as_array().cloned().unwrap_or_default();
    let media_rows = manifest["media"].as_array().cloned().unwrap_or_default();
    if manifest["group_count"].as_u64() != Some(group_rows.len() as u64) || group_rows.is_empty() {
        return Err(fail(
            "BAD_BACKUP",
            format!("{MANIFEST_NAME}: group_count does not match its groups"),
        ));
    }
    // 2. Check everything before writing anything.
    let mut groups = Vec::new();
    for row in &group_rows {
        let g = row["id"]
            .as_u64()
            .ok_or_else(|| fail("BAD_BACKUP", "manifest: a group without an id"))?;
        let l = listed(row, &format!("group {g}"))?;
        let summary = read_group(dir, &l, |_| Ok(()), |_, _| Ok(()))?;
        if summary.group != g || Some(summary.last) != row["applied_index"].as_u64() {
            return Err(fail(
                "BAD_BACKUP",
                format!(
                    "{}: holds group {} up to {}, the manifest says group {g} up to {}",
                    l.file, summary.group, summary.last, row["applied_index"]
                ),
            ));
        }
        groups.push((l, summary));
    }
    let mut media = Vec::new();
    for row in &media_rows {
        let id = row["id"].as_str().unwrap_or_default().to_string();
        if !is_media_name(&id) {
            return Err(fail("BAD_BACKUP", format!("manifest: media id {id:?}")));
        }
        let l = listed(row, &format!("media {id}"))?;
        let mut r = Hashing {
            inner: open_listed(dir, &l)?,
            sha: Sha256::new(),
            bytes: 0,
        };
        std::io::copy(&mut r, &mut std::io::sink())
            .map_err(|e| fail("IO", format!("{}: {e}", l.file)))?;
        check_sum(&l, r.bytes, r.sha)?;
        check_media_file(&dir.join(&l.file), &id)
            .map_err(|e| fail("BAD_BACKUP", format!("{} is damaged: {e}", l.file)))?;
        media.push((id, l));
    }
    let bytes: u64 = groups.iter().map(|(l, _)| l.bytes).sum::<u64>()
        + media.iter().map(|(_, l)| l.bytes).sum::<u64>();
    let mine: Vec<&(Listed, GroupFileSummary)> = groups
        .iter()
        .filter(|(_, s)| s.members.is_empty() || s.members.contains(&args.node_id))
        .collect();
    if mine.is_empty() {
        return Err(fail(
            "BAD_REQUEST",
            format!(
                "node {} is a member of no group in this backup; restore each node of the \
                 backed-up cluster with its own --node-id",
                args.node_id
            ),
        ));
    }
    let entries: u64 = mine.iter().map(|(_, s)| s.last - s.first + 1).sum();
    if args.check_only {
        print_result(
            &args,
            mine.len(),
            entries,
            media.len(),
            bytes,
            started,
            true,
        );
        return Ok(());
    }
    // 3. A fresh data directory.
    if args.data_dir.exists()
        && std::fs::read_dir(&args.data_dir)
            .map_err(|e| fail("IO", format!("{}: {e}", args.data_dir.display())))?
            .next()
            .is_some()
    {
        return Err(fail(
            "EXISTS",
            format!(
                "{} exists and is not empty; restore into a fresh directory",
                args.data_dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| fail("IO", format!("{}: {e}", args.data_dir.display())))?;
    let mut config = chatlog_storage::Config::new(&args.data_dir);
    if let Some(mb) = args.segment_mb {
        config.segment_bytes = mb << 20;
    }
    let engine = Arc::new(Engine::open(config).map_err(|e| {
        fail(
            "STORAGE",
            format!("opening the engine in {}: {e}", args.data_dir.display()),
        )
    })?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(entries)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} restore [{bar:30}] {pos}/{len} entries ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    for (l, summary) in &mine {
        runtime.block_on(write_group(&engine, dir, l, summary, &bar))?;
    }
    bar.finish_and_clear();
    let files = args.data_dir.join("media").join("files");
    if !media.is_empty() {
        std::fs::create_dir_all(&files)
            .map_err(|e| fail("IO", format!("{}: {e}", files.display())))?;
        for (id, l) in &media {
            copy_durably(&dir.join(&l.file), &files.join(id))
                .map_err(|e| fail("IO", format!("copying {}: {e}", l.file)))?;
        }
        std::fs::File::open(&files)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("IO", format!("{}: {e}", files.display())))?;
    }
    let engine = Arc::try_unwrap(engine).map_err(|_| fail("INTERNAL", "engine still shared"))?;
    engine
        .close()
        .map_err(|e| fail("STORAGE", format!("closing the engine: {e}")))?;
    print_result(
        &args,
        mine.len(),
        entries,
        media.len(),
        bytes,
        started,
        false,
    );
    Ok(())
}

fn print_result(
    args: &RestoreArgs,
    groups: usize,
    entries: u64,
    media: usize,
    bytes: u64,
    started: Instant,
    checked_only: bool,
) {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if args.json {
        println!(
            "{}",
            json!({"groups": groups, "entries": entries, "media": media, "bytes": bytes,
                   "elapsed_ms": elapsed_ms, "checked_only": checked_only})
        );
    } else if checked_only {
        println!(
            "backup {} checks: {groups} groups for node {} ({entries} entries), {media} media \
             files, {bytes} bytes",
            args.from.display(),
            args.node_id
        );
    } else {
        println!(
            "restored {groups} groups ({entries} entries) and {media} media files into {} for \
             node {} in {:.1} s; start it with `chatlog serve --data-dir {} --node-id {}` and \
             the backed-up cluster's --groups and --initial-cluster",
            args.data_dir.display(),
            args.node_id,
            elapsed_ms as f64 / 1000.0,
            args.data_dir.display(),
            args.node_id
        );
    }
}

/// Writes one group: entries in batches, the checkpoint, then the marks.
async fn write_group(
    engine: &Arc<Engine>,
    dir: &Path,
    l: &Listed,
    summary: &GroupFileSummary,
    bar: &indicatif::ProgressBar,
) -> Result<(), CliError> {
    let g = summary.group;
    let log = ids::raft_log(g).ok_or_else(|| fail("BAD_BACKUP", format!("group id {g}")))?;
    let storage = |what: String| {
        move |e: chatlog_storage::Error| fail("STORAGE", format!("group {g}: {what}: {e}"))
    };
    let batch_bytes_max = engine.write_batch_bytes_max() / 2;
    if summary.first > 0 {
        // The log continues where the backed-up replica's did (after its purge mark).
        let mut b = WriteBatch::new();
        b.purge_before(log, ids::engine_index(summary.first));
        engine
            .write(&b)
            .await
            .map_err(storage("starting the log".into()))?;
    }
    // Entries are gathered in the reader's callback and written between reads: the reader
    // is synchronous, so batches go through a bounded channel to this task.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<Vec<u8>>)>(2);
    let (dir2, file) = (dir.to_path_buf(), l.file.clone());
    let l2 = Listed {
        file: l.file.clone(),
        bytes: l.bytes,
        sha256: l.sha256.clone(),
    };
    let reader = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let mut checkpoint = Vec::new();
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut pending_first = 0;
        let mut pending_bytes = 0usize;
        let r = read_group(
            &dir2,
            &l2,
            |cp| {
                checkpoint = cp.to_vec();
                Ok(())
            },
            |index, bytes| {
                if pending.is_empty() {
                    pending_first = index;
                }
                pending_bytes += bytes.len() + 16;
                pending.push(bytes.to_vec());
                if pending_bytes >= batch_bytes_max {
                    tx.blocking_send((pending_first, std::mem::take(&mut pending)))
                        .map_err(|_| GroupFileError::Damaged("writer stopped".into()))?;
                    pending_bytes = 0;
                }
                Ok(())
            },
        );
        if let Err(e) = r {
            return Err(format!("{file}: {e}"));
        }
        if !pending.is_empty() {
            tx.blocking_send((pending_first, pending))
                .map_err(|_| "writer stopped".to_string())?;
        }
        Ok(checkpoint)
    });
    let mut next = summary.first;
    while let Some((first, batch_entries)) = rx.recv().await {
        if first != next {
            return Err(fail(
                "INTERNAL",
                format!("group {g}: batch at {first}, expected {next}"),
            ));
        }
        let mut b = WriteBatch::new();
        b.append_many(log, ids::engine_index(first), batch_entries.iter());
        engine
            .write(&b)
            .await
            .map_err(storage(format!("writing entries from {first}")))?;
        next += batch_entries.len() as u64;
        bar.inc(batch_entries.len() as u64);
    }
    let checkpoint = reader
        .await
        .map_err(|e| fail("INTERNAL", e.to_string()))?
        .map_err(|e| fail("BAD_BACKUP", e))?;
    if next != summary.last + 1 {
        return Err(fail(
            "INTERNAL",
            format!(
                "group {g}: wrote up to {next}, expected {}",
                summary.last + 1
            ),
        ));
    }
    if !checkpoint.is_empty() {
        chatlog_raft::state_machine::write_checkpoint_bytes(engine, g, &checkpoint)
            .await
            .map_err(|e| fail("STORAGE", format!("group {g}: the checkpoint: {e}")))?;
    }
    let last: LogId = summary.last_log_id;
    let vote = Vote::new_committed(last.leader_id.term, last.leader_id.node_id);
    let mut b = WriteBatch::new();
    if let Some(p) = &summary.purged {
        b.put_meta(log, ids::META_PURGED, p);
    }
    b.put_meta(log, ids::META_COMMITTED, &codec::encode_log_id(&last));
    b.put_meta(log, ids::META_VOTE, &codec::encode_vote(&vote));
    engine
        .write(&b)
        .await
        .map_err(storage("writing the vote and committed marks".into()))?;
    Ok(())
}

/// Copies `from` to `to` through a temporary name, fsynced before the rename.
fn copy_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = to.with_extension("restoring");
    {
        let mut src = std::fs::File::open(from)?;
        let mut dst = std::fs::File::create(&tmp)?;
        std::io::copy(&mut src, &mut dst)?;
        dst.flush()?;
        dst.sync_all()?;
    }
    std::fs::rename(&tmp, to)
}
