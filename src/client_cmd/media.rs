//! `chatlog upload` and `chatlog download`: whole files through the client library's
//! resumable transfers, with a progress bar.
//!
//! What it owns: the flags, the resume state between runs (an upload's id in a small file
//! under the resume directory, keyed by server, path, size and modification time; a
//! download's partial output `FILE.part` next to the output) and the printed results.
//! What it must not do: move bytes itself (`chatlog_wire::Client::upload_file` and
//! `download_file` do, with their checks).

use std::path::{Path, PathBuf};

use chatlog_wire::client::{
    DownloadCheck, DownloadOptions, TransferProgress, UploadOptions, media_id_hex, parse_media_id,
};
use chatlog_wire::proto::v1;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::output::Printer;
use super::{CmdError, CmdResult, Conn, connect, random_client_id};

/// Flags of `upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The file to upload (1 byte to 4 GiB).
    file: PathBuf,
    /// Also post a message with the file to this chat.
    #[arg(long, value_name = "CHAT")]
    chat: Option<u64>,
    /// The text of that message (with --chat).
    #[arg(long, value_name = "TEXT", requires = "chat")]
    caption: Option<String>,
    /// MIME type recorded with the file (default: guessed from the extension).
    #[arg(long)]
    mime: Option<String>,
    /// Where interrupted uploads are remembered, to resume on the next run.
    #[arg(long, env = "CHATLOG_RESUME_DIR", value_name = "DIR")]
    resume_dir: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// The media id (64 hex digits, as `upload` prints it).
    media_id: String,
    /// Output file (default: the file's recorded name, else the media id, in the current
    /// directory). Written as `FILE.part` until complete and checked, then renamed.
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Also check the whole file's SHA-256 against the media id (always done when
    /// resuming from FILE.part).
    #[arg(long)]
    verify_sha256: bool,
    #[command(flatten)]
    conn: Conn,
}

fn progress_bar(total: u64, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn guess_mime(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "oga") => "audio/ogg",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    }
}

/// The resume file of an upload of `file` to `server`.
fn resume_file(dir: Option<&Path>, server: &str, file: &Path) -> CmdResult<PathBuf> {
    let local = |e: std::io::Error| CmdError::new("LOCAL_FILE", format!("{}: {e}", file.display()));
    let path = std::fs::canonicalize(file).map_err(local)?;
    let meta = std::fs::metadata(&path).map_err(local)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = Sha256::digest(format!(
        "{server}\n{}\n{}\n{mtime}",
        path.display(),
        meta.len()
    ));
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(std::env::temp_dir)
            .join("chatlog")
            .join("uploads"),
    };
    Ok(dir.join(format!("{}.upload", &media_id_hex(&key)[..32])))
}

pub(super) async fn upload(a: UploadArgs) -> CmdResult {
    let c = connect(&a.conn, true).await?;
    let resume_path = resume_file(a.resume_dir.as_deref(), &a.conn.server, &a.file)?;
    let resume_upload_id = std::fs::read_to_string(&resume_path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mime = a
        .mime
        .clone()
        .unwrap_or_else(|| guess_mime(&a.file).to_string());
    let size = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(size, a.conn.json);
    let mut remembered = resume_upload_id;
    let mut remember_error = None;
    let finished = c
        .upload_file(
            &a.file,
            UploadOptions {
                mime_type: mime,
                resume_upload_id,
                ..Default::default()
            },
            |p: TransferProgress| {
                if remembered != Some(p.upload_id) && p.upload_id != 0 {
                    remembered = Some(p.upload_id);
                    let written = resume_path
                        .parent()
                        .map_or(Ok(()), std::fs::create_dir_all)
                        .and_then(|()| std::fs::write(&resume_path, p.upload_id.to_string()));
                    if let Err(e) = written {
                        remember_error = Some(e);
                    }
                }
                bar.set_position(p.bytes_done);
            },
        )
        .await?;
    bar.finish_and_clear();
    if let Some(e) = remember_error {
        eprintln!(
            "warning: could not remember the upload in {}: {e}",
            resume_path.display()
        );
    }
    let _ = std::fs::remove_file(&resume_path);
    let media = finished.media.clone().unwrap_or_default();
    let mut out = json!({
        "media_id": finished.media_id,
        "size_bytes": media.size_bytes,
        "mime_type": media.mime_type,
        "file_name": media.file_name,
        "deduplicated": finished.deduplicated,
    });
    let mut posted = None;
    if let Some(chat) = a.chat {
        let client_id = random_client_id();
        let r = c
            .send_message(v1::SendMessageRequest {
                chat_id: chat,
                client_message_id: client_id,
                text: a.caption.clone().unwrap_or_default(),
                media: Some(media.clone()),
                reply_to_seq: 0,
            })
            .await?;
        out["chat_id"] = json!(r.chat_id);
        out["seq"] = json!(r.seq);
        out["client_id"] = json!(client_id);
        posted = Some(r);
    }
    Printer::new(&a.conn).result(&out, || {
        let mut line = format!(
            "uploaded {} ({} bytes) as media {}",
            a.file.display(),
            media.size_bytes,
            finished.media_id
        );
        if finished.deduplicated {
            line.push_str(" (already stored, not stored twice)");
        }
        if let Some(r) = posted {
            line.push_str(&format!("; sent #{} to chat {}", r.seq, r.chat_id));
        }
        line
    });
    Ok(())
}

pub(super) async fn download(a: DownloadArgs) -> CmdResult {
    let sha256 = parse_media_id(&a.media_id).ok_or_else(|| {
        CmdError::new(
            "BAD_REQUEST",
            format!("{:?} is not a media id (64 hex digits)", a.media_id),
        )
    })?;
    let c = connect(&a.conn, true).await?;
    let info = c
        .media_info(v1::MediaInfoRequest {
            sha256: bytes::Bytes::copy_from_slice(&sha256),
        })
        .await?;
    let media = info.media.unwrap_or_default();
    let output = a.output.clone().unwrap_or_else(|| {
        // Only the last component of a recorded name, so a name cannot point elsewhere.
        Path::new(&media.file_name)
            .file_name()
            .map(PathBuf::from)
            .filter(|n| !n.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(&a.media_id))
    });
    let mut part = output.clone().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let bar = progress_bar(media.size_bytes, a.conn.json);
    let resumed_from = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let size = c
        .download_file(
            sha256,
            &part,
            DownloadOptions {
                resume: true,
                check: if a.verify_sha256 {
                    DownloadCheck::Sha256
                } else {
                    DownloadCheck::PartCrcs
                },
                ..Default::default()
            },
            |p| bar.set_position(p.bytes_done),
        )
        .await
        .inspect_err(|e| {
            // A partial file that fails the final hash check cannot be resumed.
            if matches!(e, chatlog_wire::client::ClientError::Protocol(_)) {
                let _ = std::fs::remove_file(&part);
            }
        })?;
    bar.finish_and_clear();
    let chunk = u64::from(chatlog_wire::limits::MEDIA_DOWNLOAD_BYTES_MAX);
    std::fs::rename(&part, &output).map_err(|e| {
        CmdError::new(
            "LOCAL_FILE",
            format!("renaming {} to {}: {e}", part.display(), output.display()),
        )
    })?;
    Printer::new(&a.conn).result(
        &json!({
            "media_id": a.media_id,
            "path": output.display().to_string(),
            "size_bytes": size,
            "mime_type": media.mime_type,
            "file_name": media.file_name,
            "resumed_from": resumed_from.min(size) / chunk * chunk,
        }),
        || format!("downloaded {} bytes to {}", size, output.display()),
    );
    Ok(())
}
