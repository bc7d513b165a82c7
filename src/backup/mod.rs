//! Backups of a whole cluster and their restore into fresh data directories
//! (`chatlog admin backup`, `chatlog restore`; the runbook is in docs/operations.md).
//!
//! What it owns: the bytes of a backup directory (this file), the HTTP endpoints that
//! stream one group or one media file out of a running node (`serve.rs`), the admin
//! command that gathers them into a directory with a manifest (`cmd.rs`), and the offline
//! restore that checks every byte of a backup before it writes a fresh node's data
//! directory (`restore.rs`). What it must not do: change a running group (a backup only
//! reads: a read barrier, the durable checkpoint, the Raft log), hold a group's log in
//! memory (it is streamed in bounded chunks), or write anything when a backup does not
//! check.
//!
//! What a backup of a group is. The Raft log is the message log (DESIGN.md decision 1):
//! the state machine's index points at entries of the log for every message's bytes. So a
//! group's consistent copy is its latest durable state-machine checkpoint (at applied
//! index S) plus every retained Raft log entry up to an index A ≥ S, taken after a read
//! barrier: A is an index this replica has applied after the barrier, so every write
//! acknowledged before the backup asked for the group is at or below A. The restored
//! node loads the checkpoint and re-applies (S, A] exactly as after a restart. Nothing
//! is re-encoded: log entries travel as the bytes the log holds (their `codec` encoding,
//! which carries each entry's log id), the checkpoint as its chunks' bytes.
//!
//! # Backup directory
//!
//! ```text
//! DIR/manifest.json          written last (temp file, fsync, rename): no manifest = no
//!                            backup. Per file: path, size, SHA-256.
//! DIR/groups/{g:05}.chlgbak  one group (format below)
//! DIR/media/{sha256 hex}     one finished media file, byte for byte as the node's media
//!                            store holds it (`media/store.rs`: 4 KiB header, content,
//!                            per-part CRC slots); checked on the way in (header CRC,
//!                            SHA-256 of the content = its name)
//! ```
//!
//! # Group file (`.chlgbak`), little-endian
//!
//! ```text
//! header:     magic "CHLGBAK1" | version u32 (= 1) | group u64 | first u64 | last u64
//!             | purged_len u32 | purged (codec log id, or nothing) | checkpoint_len u64
//!             | header CRC-32 u32 (over the header bytes before it)
//! checkpoint: checkpoint_len bytes (`state_machine::read_checkpoint`) | CRC-32 u32
//! entries:    (last - first + 1) × ( len u32 | CRC-32 u32 of the bytes | bytes )
//!             bytes = the Raft entry at index first, first + 1, … (`codec::encode_entry`)
//! trailer:    magic "CHLGEND1" | entries u64 | CRC-32 u32 (over the trailer before it)
//! ```
//!
//! `first` is the first Raft index the log holds (0 for a log never purged), `last` the
//! index A. `purged` is the log's purge mark when it has one; with log retention the
//! entries from `first` to the mark are committed history kept for reads (raft
//! `log_store`, "Retention"), restored as such. The trailer makes a cut stream visible even without the
//! manifest; the manifest's SHA-256 makes any changed byte visible.

pub mod cmd;
pub mod restore;
pub mod serve;

use std::io::Read;

/// First bytes of a group file.
pub const GROUP_MAGIC: &[u8; 8] = b"CHLGBAK1";
/// First bytes of a group file's trailer.
pub const TRAILER_MAGIC: &[u8; 8] = b"CHLGEND1";
/// Version of the group file and of the manifest.
pub const FORMAT_VERSION: u32 = 1;
/// `format` field of the manifest.
pub const MANIFEST_FORMAT: &str = "chatlog-backup";
/// Name of the manifest in a backup directory.
pub const MANIFEST_NAME: &str = "manifest.json";

/// Bytes of log entries one read of the engine gathers while a group streams out, and the
/// unit the stream is cut into. Why: with [`STREAM_CHUNKS_IN_FLIGHT_MAX`] it bounds the
/// memory one backup stream holds on the node (16 MiB), whatever the group's size.
pub const STREAM_CHUNK_BYTES_MAX: usize = 4 << 20;
/// Chunks queued between the engine reader and the HTTP body of one stream. Why: the
/// reader stays one chunk ahead of a slow network, and no further.
pub const STREAM_CHUNKS_IN_FLIGHT_MAX: usize = 3;
/// Largest Raft entry a group file may carry. Why: the node's frames and engine batches
/// are smaller (16 MiB); a length beyond it in a file is damage, refused before any buffer
/// grows.
pub const ENTRY_BYTES_MAX: u32 = 64 << 20;
/// Largest checkpoint a group file may carry. Why: the state of one group lives in one
/// node's memory; 4 GiB is far past anything a node could hold, so a larger length is
/// damage, refused before any buffer grows.
pub const CHECKPOINT_BYTES_MAX: u64 = 4 << 30;
/// Largest manifest read. Why: a manifest lists one line per group (at most 2^16) and per
/// media file; 64 MiB holds hundreds of thousands of entries.
pub const MANIFEST_BYTES_MAX: u64 = 64 << 20;
/// Longest a purge mark (a codec log id) may be in a group file header.
pub const PURGED_BYTES_MAX: u32 = 64;

/// What a group file says about itself once read to the end and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFileSummary {
    pub group: u64,
    /// First Raft index held.
    pub first: u64,
    /// Last Raft index held (the index the backup stands at).
    pub last: u64,
    /// Log id of the last entry.
    pub last_log_id: chatlog_raft::types::LogId,
    /// The purge mark's bytes, if the log had one.
    pub purged: Option<Vec<u8>>,
    /// Applied index of the checkpoint, `None` without a checkpoint.
    pub checkpoint_index: Option<u64>,
    pub checkpoint_bytes: u64,
    /// Nodes (voters and learners) of the last membership up to `last`.
    pub members: Vec<u64>,
}

/// Why a group file does not check. Names what was wrong where.
#[derive(Debug, thiserror::Error)]
pub enum GroupFileError {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Damaged(String),
}

fn damaged(detail: impl Into<String>) -> GroupFileError {
    GroupFileError::Damaged(detail.into())
}

/// Encodes a group file's header.
pub fn encode_header(
    group: u64,
    first: u64,
    last: u64,
    purged: Option<&[u8]>,
    checkpoint_len: u64,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(GROUP_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&group.to_le_bytes());
    h.extend_from_slice(&first.to_le_bytes());
    h.extend_from_slice(&last.to_le_bytes());
    let purged = purged.unwrap_or_default();
    h.extend_from_slice(&(purged.len() as u32).to_le_bytes());
    h.extend_from_slice(purged);
    h.extend_from_slice(&checkpoint_len.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Encodes one entry record (`len | crc | bytes`) into `out`.
pub fn put_entry(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes the trailer.
pub fn encode_trailer(entries: u64) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(TRAILER_MAGIC);
    t.extend_from_slice(&entries.to_le_bytes());
    let crc = crc32fast::hash(&t);
    t.extend_from_slice(&crc.to_le_bytes());
    t
}

/// Reads a group file from `r` to its end, checking every CRC, every entry's index
/// (each entry must carry the index it sits at) and the trailer, and hands the checkpoint
/// bytes and each entry `(raft index, bytes)` to the callbacks in order. Memory: one
/// entry at a time, plus the checkpoint when `on_checkpoint` is called.
pub fn read_group_file<R: Read>(
    mut r: R,
    mut on_checkpoint: impl FnMut(&[u8]) -> Result<(), GroupFileError>,
    mut on_entry: impl FnMut(u64, &[u8]) -> Result<(), GroupFileError>,
) -> Result<GroupFileSummary, GroupFileError> {
    use chatlog_raft::types::EntryPayload;
    let mut head = vec![0u8; 8 + 4 + 8 + 8 + 8 + 4];
    read_exact(&mut r, &mut head, "the header")?;
    if &head[..8] != GROUP_MAGIC {
        return Err(damaged("not a chatlog group backup (bad magic)"));
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    let version = u32_at(&head, 8);
    if version != FORMAT_VERSION {
        return Err(damaged(format!(
            "version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let group = u64_at(&head, 12);
    let first = u64_at(&head, 20);
    let last = u64_at(&head, 28);
    let purged_len = u32_at(&head, 36);
    if purged_len > PURGED_BYTES_MAX {
        return Err(damaged(format!("purge mark of {purged_len} bytes")));
    }
    let mut purged = vec![0u8; purged_len as usize];
    read_exact(&mut r, &mut purged, "the purge mark")?;
    let mut tail = [0u8; 12];
    read_exact(&mut r, &mut tail, "the header")?;
    let checkpoint_len = u64_at(&tail, 0);
    let mut covered = head.clone();
    covered.extend_from_slice(&purged);
    covered.extend_from_slice(&tail[..8]);
    if crc32fast::hash(&covered) != u32_at(&tail, 8) {
        return Err(damaged("header CRC does not match"));
    }
    if last < first {
        return Err(damaged(format!(
            "holds no entry (first {first}, last {last})"
        )));
    }
    if checkpoint_len > CHECKPOINT_BYTES_MAX {
        return Err(damaged(format!("checkpoint of {checkpoint_len} bytes")));
    }
    let mut checkpoint_index = None;
    let mut members: Vec<u64> = Vec::new();
    if checkpoint_len > 0 {
        let mut cp = vec![0u8; checkpoint_len as usize];
        read_exact(&mut r, &mut cp, "the checkpoint")?;
        let mut crc = [0u8; 4];
        read_exact(&mut r, &mut crc, "the checkpoint CRC")?;
        if crc32fast::hash(&cp) != u32::from_le_bytes(crc) {
            return Err(damaged("checkpoint CRC does not match"));
        }
        let (applied, membership) = chatlog_raft::state_machine::checkpoint_header(&cp)
            .map_err(|e| damaged(format!("checkpoint: {e}")))?;
        checkpoint_index = Some(applied.map_or(0, |l| l.index));
        members = membership.membership().nodes().map(|(n, _)| *n).collect();
        on_checkpoint(&cp)?;
    }
    if let Some(s) = checkpoint_index
        && (s > last || s + 1 < first)
    {
        return Err(damaged(format!(
            "checkpoint at {s} is outside the log it comes with ({first}..={last})"
        )));
    }
    let mut last_log_id = None;
    let mut buf = Vec::new();
    for index in first..=last {
        let mut rec = [0u8; 8];
        read_exact(&mut r, &mut rec, &format!("entry {index}"))?;
        let len = u32_at(&rec, 0);
        if len > ENTRY_BYTES_MAX {
            return Err(damaged(format!("entry {index} claims {len} bytes")));
        }
        buf.resize(len as usize, 0);
        read_exact(&mut r, &mut buf, &format!("entry {index}"))?;
        if crc32fast::hash(&buf) != u32_at(&rec, 4) {
            return Err(damaged(format!("entry {index}: CRC does not match")));
        }
        let entry = chatlog_raft::codec::decode_entry(&bytes::Bytes::copy_from_slice(&buf))
            .map_err(|e| damaged(format!("entry {index}: {e}")))?;
        if entry.log_id.index != index {
            return Err(damaged(format!(
                "entry at {index} says it is {}",
                entry.log_id
            )));
        }
        if let EntryPayload::Membership(m) = &entry.payload {
            members = m.nodes().map(|(n, _)| *n).collect();
        }
        last_log_id = Some(entry.log_id);
        on_entry(index, &buf)?;
    }
    let mut trailer = [0u8; 20];
    read_exact(&mut r, &mut trailer, "the trailer")?;
    if &trailer[..8] != TRAILER_MAGIC || crc32fast::hash(&trailer[..16]) != u32_at(&trailer, 16) {
        return Err(damaged("trailer missing or damaged"));
    }
    if u64_at(&trailer, 8) != last - first + 1 {
        return Err(damaged("trailer counts other entries than the header"));
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra)? != 0 {
        return Err(damaged("bytes after the trailer"));
    }
    Ok(GroupFileSummary {
        group,
        first,
        last,
        last_log_id: last_log_id.expect("last >= first"),
        purged: (!purged.is_empty()).then_some(purged),
        checkpoint_index,
        checkpoint_bytes: checkpoint_len,
        members,
    })
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), GroupFileError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            damaged(format!("cut short in {what}"))
        } else {
            GroupFileError::Io(e)
        }
    })
}

/// Checks a media file as the media store writes it (`media/store.rs`): header CRC, and
/// the SHA-256 of its content against `id_hex` (media are named by it). Reads the file
/// once in bounded chunks.
pub fn check_media_file(path: &std::path::Path, id_hex: &str) -> Result<u64, String> {
    use sha2::{Digest, Sha256};
    let header_bytes = crate::media::store::HEADER_BYTES as usize;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut header = vec![0u8; header_bytes];
    f.read_exact(&mut header)
        .map_err(|e| format!("{}: header: {e}", path.display()))?;
    if &header[..8] != crate::media::store::MAGIC {
        return Err(format!("{}: not a media file (bad magic)", path.display()));
    }
    let crc_at = header_bytes - 4;
    let crc = u32::from_le_bytes(header[crc_at..].try_into().expect("4"));
    if crc32fast::hash(&header[..crc_at]) != crc {
        return Err(format!("{}: header CRC does not match", path.display()));
    }
    // magic 8 | version 4 | flags 4 | upload_id 8 | uploader 8 | size 8
    let size = u64::from_le_bytes(header[32..40].try_into().expect("8"));
    let mut sha = Sha256::new();
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n])
            .map_err(|e| format!("{}: content cut short: {e}", path.display()))?;
        sha.update(&buf[..n]);
        left -= n as u64;
    }
    let got = hex_of(&sha.finalize());
    if got != id_hex {
        return Err(format!(
            "{}: content SHA-256 is {got}, the file is named {id_hex}",
            path.display()
        ));
    }
    Ok(size)
}

/// Lower-case hex of `bytes`.
pub fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A media file name is 64 lower-case hex digits (a SHA-256).
pub fn is_media_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_trailer_round_trip_and_damage_is_named() {
        use chatlog_raft::types::{ChatBatch, Entry, EntryPayload, log_id};
        let mut file = encode_header(3, 0, 1, None, 0);
        for i in 0..=1u64 {
            let e = Entry {
                log_id: log_id(1, 1, i),
                payload: EntryPayload::Normal(ChatBatch(bytes::Bytes::from_static(b"x"))),
            };
            put_entry(&mut file, &chatlog_raft::codec::encode_entry(&e));
        }
        file.extend_from_slice(&encode_trailer(2));
        let mut seen = Vec::new();
        let s = read_group_file(
            &file[..],
            |_| Ok(()),
            |i, _| {
                seen.push(i);
                Ok(())
            },
        )
        .expect("checks");
        assert_eq!((s.group, s.first, s.last), (3, 0, 1));
        assert_eq!(seen, vec![0, 1]);
        // Any flipped byte, and any cut, is refused.
        for at in [0, 10, 45, 60, file.len() - 3] {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            assert!(
                read_group_file(&bad[..], |_| Ok(()), |_, _| Ok(())).is_err(),
                "{at}"
            );
        }
        let cut = &file[..file.len() - 21];
        let e = read_group_file(cut, |_| Ok(()), |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
    }
}
