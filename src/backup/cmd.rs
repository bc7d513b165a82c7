//! `chatlog admin backup --out DIR`: a consistent copy of every group and every media
//! file of a running cluster, gathered over the nodes' HTTP ports into a directory.
//!
//! What it owns: choosing a node for each group and media file (the first `--server`
//! that holds it), streaming each into its file while hashing it (SHA-256), checking each
//! file once written (a group file read back to its trailer, every CRC and index; a media
//! file's header CRC and content SHA-256), the progress bar, and the manifest, written
//! last. What it must not do: keep a file in memory (bounded chunks, one at a time), or
//! leave a directory that looks like a finished backup when it is not (no manifest until
//! everything checked).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{FORMAT_VERSION, MANIFEST_FORMAT, MANIFEST_NAME, check_media_file, hex_of};
use crate::admin_cmd::AdminConn;
use crate::cli::CliError;

/// Bound of the small JSON calls (inventory, status).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest one stream may go without a byte arriving. Why: a stream is as long as its
/// group; only silence means the node or the network is stuck.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response head read. Why: our server's heads are a few hundred bytes.
const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Largest error body read from a refused stream.
const ERROR_BODY_BYTES_MAX: usize = 64 * 1024;
/// Times a group whose stream failed is asked for again (from the next server that holds
/// it, then round again). Why: a stream cut by a leader change or a restart is worth one
/// more try; a persistent failure is reported.
const GROUP_ATTEMPTS_MAX: usize = 3;

/// Flags of `chatlog admin backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: AdminConn,
    /// More nodes' HTTP addresses to fetch from (repeatable). Every group and media file
    /// is fetched from the first of `--server` and these that holds it; with fewer nodes
    /// than the cluster has, name enough that each group has a replica among them.
    #[arg(long = "also", value_name = "HTTP_ADDR")]
    pub also: Vec<String>,
    /// The backup directory (created; must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

fn fail(code: &str, message: impl Into<String>) -> CliError {
    format!("{code}: {}", message.into()).into()
}

async fn get_json(server: &str, path: &str, token: Option<&str>) -> Result<Value, CliError> {
    let r = crate::http::client::request(server, "GET", path, token, None, CALL_TIMEOUT)
        .await
        .map_err(|e| fail("CONNECT_FAILED", e))?;
    let v: Value = serde_json::from_slice(&r.body)
        .map_err(|e| fail("PROTOCOL", format!("{server}{path}: {e}")))?;
    if r.status != 200 {
        let code = v["code"].as_str().unwrap_or("HTTP").to_string();
        return Err(fail(&code, v["error"].as_str().unwrap_or_default()));
    }
    Ok(v)
}

/// Bound of `admin snapshot` (the node waits up to `serve::SNAPSHOT_WAIT` itself).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `chatlog admin snapshot`.
pub async fn snapshot(conn: AdminConn) -> Result<(), CliError> {
    let token = conn.admin_token.as_deref().filter(|t| !t.is_empty());
    let r = crate::http::client::request(
        &conn.server,
        "POST",
        "/admin/snapshot",
        token,
        Some(b"{}"),
        SNAPSHOT_TIMEOUT,
    )
    .await
    .map_err(|e| fail("CONNECT_FAILED", e))?;
    let v: Value = serde_json::from_slice(&r.body)
        .map_err(|e| fail("PROTOCOL", format!("{}: {e}", conn.server)))?;
    if r.status != 200 {
        let code = v["code"].as_str().unwrap_or("HTTP").to_string();
        return Err(fail(&code, v["error"].as_str().unwrap_or_default()));
    }
    if conn.json {
        println!("{v}");
    } else {
        let groups = v["groups"].as_array().cloned().unwrap_or_default();
        println!(
            "node {}: {} groups checkpointed{}",
            v["node"],
            groups.len(),
            if v["done"] == true {
                ""
            } else {
                " (some not yet: see --json)"
            }
        );
        for g in groups {
            println!(
                "  group {:>5}  applied {:>10}  checkpoint {}",
                g["id"], g["applied"], g["checkpoint"]
            );
        }
    }
    Ok(())
}

struct Item {
    /// Path inside the backup directory.
    file: String,
    bytes: u64,
    sha256: String,
}

/// Runs `chatlog admin backup`.
pub async fn backup(args: BackupArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let token = args.conn.admin_token.as_deref().filter(|t| !t.is_empty());
    let mut servers = vec![args.conn.server.clone()];
    servers.extend(args.also.iter().cloned());
    // What the cluster has (groups from the placement) and what each server holds.
    let status = get_json(&servers[0], "/admin/status", token).await?;
    let mut inventories = Vec::new();
    for s in &servers {
        inventories.push(get_json(s, "/admin/backup", token).await?);
    }
    let cluster_id = inventories[0]["cluster_id"].as_u64().unwrap_or_default();
    let mut groups: Vec<u64> = status["placement"]["groups"]
        .as_array()
        .map(|a| a.iter().filter_map(|g| g["id"].as_u64()).collect())
        .unwrap_or_default();
    if groups.is_empty() {
        // Not bootstrapped yet (a single node early on): what the node holds.
        groups = inventories[0]["groups"]
            .as_array()
            .map(|a| a.iter().filter_map(|g| g["id"].as_u64()).collect())
            .unwrap_or_default();
    }
    groups.sort_unstable();
    groups.dedup();
    let holders = |g: u64| -> Vec<usize> {
        (0..servers.len())
            .filter(|i| {
                inventories[*i]["groups"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["id"].as_u64() == Some(g)))
            })
            .collect()
    };
    for g in &groups {
        if holders(*g).is_empty() {
            return Err(fail(
                "INCOMPLETE",
                format!(
                    "no server given holds a replica of group {g}; add --also HTTP_ADDR of \
                     a node that does"
                ),
            ));
        }
    }
    let mut media: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for (i, inv) in inventories.iter().enumerate() {
        for m in inv["media"].as_array().into_iter().flatten() {
            if let (Some(id), Some(bytes)) = (m["id"].as_str(), m["bytes"].as_u64()) {
                media.entry(id.to_string()).or_insert((i, bytes));
            }
        }
    }
    // The directory: new or empty.
    if args.out.exists()
        && std::fs::read_dir(&args.out)
            .map_err(|e| fail("IO", format!("{}: {e}", args.out.display())))?
            .next()
            .is_some()
    {
        return Err(fail(
            "EXISTS",
            format!("{} exists and is not empty", args.out.display()),
        ));
    }
    for sub in ["groups", "media"] {
        std::fs::create_dir_all(args.out.join(sub))
            .map_err(|e| fail("IO", format!("creating {}: {e}", args.out.display())))?;
    }
    let bar = if args.conn.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((groups.len() + media.len()) as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} backup [{bar:30}] {pos}/{len} files, {msg} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut total_bytes = 0u64;
    let mut group_rows = Vec::new();
    for g in &groups {
        let file = format!("groups/{g:05}.chlgbak");
        let path = args.out.join(&file);
        let hs = holders(*g);
        let mut last_err = None;
        let mut done = None;
        for attempt in 0..GROUP_ATTEMPTS_MAX * hs.len() {
            let server = &servers[hs[attempt % hs.len()]];
            let url = format!("/admin/backup/group/{g}");
            let fetched = fetch_to_file(server, &url, token, &path, &bar, total_bytes).await;
            let item = match fetched {
                Ok(item) => item,
                Err(e) => {
                    last_err = Some(format!("{server}: {e}"));
                    continue;
                }
            };
            let check = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let f = std::fs::File::open(&path)?;
                    super::read_group_file(
                        std::io::BufReader::with_capacity(1 << 20, f),
                        |_| Ok(()),
                        |_, _| Ok(()),
                    )
                    .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .await
                .map_err(|e| fail("INTERNAL", e.to_string()))?
            };
            match check {
                Ok(summary) if summary.group == *g => {
                    done = Some((item, summary));
                    break;
                }
                Ok(summary) => {
                    last_err = Some(format!("{server} sent group {}", summary.group));
                }
                Err(e) => last_err = Some(format!("{server}: {file}: {e}")),
            }
        }
        let Some((item, summary)) = done else {
            bar.abandon();
            return Err(fail(
                "BACKUP_FAILED",
                format!(
                    "group {g}: {}",
                    last_err.unwrap_or_else(|| "no attempt".into())
                ),
            ));
        };
        total_bytes += item.bytes;
        bar.inc(1);
        group_rows.push(json!({
            "id": g,
            "file": item.file,
            "bytes": item.bytes,
            "sha256": item.sha256,
            "first_index": summary.first,
            "applied_index": summary.last,
            "applied_term": summary.last_log_id.leader_id.term,
            "checkpoint_index": summary.checkpoint_index,
            "members": summary.members,
        }));
    }
    let mut media_rows = Vec::new();
    for (id, (i, _)) in &media {
        let file = format!("media/{id}");
        let path = args.out.join(&file);
        let url = format!("/admin/backup/media/{id}");
        let item = fetch_to_file(&servers[*i], &url, token, &path, &bar, total_bytes)
            .await
            .map_err(|e| fail("BACKUP_FAILED", format!("media {id}: {}: {e}", servers[*i])))?;
        let (p, id2) = (path.clone(), id.clone());
        tokio::task::spawn_blocking(move || check_media_file(&p, &id2))
            .await
            .map_err(|e| fail("INTERNAL", e.to_string()))?
            .map_err(|e| fail("BACKUP_FAILED", e))?;
        total_bytes += item.bytes;
        bar.inc(1);
        media_rows.push(json!({
            "id": id, "file": file, "bytes": item.bytes, "sha256": item.sha256,
        }));
    }
    bar.finish_and_clear();
    let manifest = json!({
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "cluster_id": cluster_id,
        "created_ms": crate::media::store::now_ms(),
        "servers": servers,
        "group_count": group_rows.len(),
        "groups": group_rows,
        "media_count": media_rows.len(),
        "media": media_rows,
        "bytes": total_bytes,
    });
    write_manifest(&args.out, &manifest).map_err(|e| fail("IO", e))?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if args.conn.json {
        println!(
            "{}",
            json!({
                "out": args.out.display().to_string(),
                "groups": manifest["group_count"],
                "media": manifest["media_count"],
                "bytes": total_bytes,
                "elapsed_ms": elapsed_ms,
                "manifest": manifest,
            })
        );
    } else {
        println!(
            "backup of {} groups and {} media files ({} bytes) in {} in {:.1} s",
            manifest["group_count"],
            manifest["media_count"],
            total_bytes,
            args.out.display(),
            elapsed_ms as f64 / 1000.0
        );
        for g in manifest["groups"].as_array().into_iter().flatten() {
            println!(
                "  group {:>5}  applied {:>10}  entries {:>10}  {:>12} bytes",
                g["id"],
                g["applied_index"],
                g["applied_index"].as_u64().unwrap_or(0) + 1
                    - g["first_index"].as_u64().unwrap_or(0),
                g["bytes"]
            );
        }
    }
    Ok(())
}

/// Writes the manifest durably: temp file, fsync, rename, directory fsync.
fn write_manifest(dir: &Path, manifest: &Value) -> Result<(), String> {
    let tmp = dir.join(format!("{MANIFEST_NAME}.tmp"));
    let io = |e: std::io::Error| format!("writing {}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| e.to_string())?;
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(MANIFEST_NAME)).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// GETs `path` from `server` and writes the body to `out` (fsynced), hashing it. Follows
/// `Content-Length` or chunked bodies, each read bounded by [`STREAM_IDLE_TIMEOUT`].
async fn fetch_to_file(
    server: &str,
    path: &str,
    token: Option<&str>,
    out: &Path,
    bar: &indicatif::ProgressBar,
    done_before: u64,
) -> Result<Item, String> {
    let idle =
        |what: &'static str| move |_| format!("no bytes for {STREAM_IDLE_TIMEOUT:?} ({what})");
    let stream = tokio::time::timeout(CALL_TIMEOUT, tokio::net::TcpStream::connect(server))
        .await
        .map_err(idle("connecting"))?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut stream = BufReader::with_capacity(1 << 20, stream);
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\nUser-Agent: chatlog-cli/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .get_mut()
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // Status line and headers.
    let mut status = 0u16;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut head_bytes = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(STREAM_IDLE_TIMEOUT, stream.read_line(&mut line))
            .await
            .map_err(idle("head"))?
            .map_err(|e| e.to_string())?;
        head_bytes += n;
        if n == 0 || head_bytes > HEAD_BYTES_MAX {
            return Err("answer head cut short or too long".into());
        }
        let l = line.trim_end();
        if status == 0 {
            status = l
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line {l:?}"))?;
            continue;
        }
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse().map_err(|_| "bad Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    // The path inside the backup directory: `groups/…` or `media/…`.
    let file_name = out
        .strip_prefix(out.parent().and_then(Path::parent).unwrap_or(Path::new("")))
        .unwrap_or(out)
        .display()
        .to_string();
    let mut sink = Sink {
        file: std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?,
        sha: Sha256::new(),
        bytes: 0,
    };
    let mut buf = vec![0u8; 1 << 20];
    if status != 200 {
        let mut body = Vec::new();
        let _ = tokio::time::timeout(
            CALL_TIMEOUT,
            (&mut stream)
                .take(ERROR_BODY_BYTES_MAX as u64)
                .read_to_end(&mut body),
        )
        .await;
        let _ = std::fs::remove_file(out);
        let text = String::from_utf8_lossy(&body);
        // A chunked error body: the JSON is inside; show it whole, it is short.
        return Err(format!("HTTP {status}: {}", text.trim()));
    }
    if chunked {
        loop {
            line.clear();
            tokio::time::timeout(STREAM_IDLE_TIMEOUT, stream.read_line(&mut line))
                .await
                .map_err(idle("chunk size"))?
                .map_err(|e| e.to_string())?;
            let size_text = line.trim().split(';').next().unwrap_or_default();
            if line.is_empty() {
                return Err("stream cut between chunks (the node stopped the stream)".into());
            }
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            if size == 0 {
                break;
            }
            copy_body(
                &mut stream,
                &mut sink,
                Some(size),
                &mut buf,
                bar,
                done_before,
            )
            .await?;
            line.clear();
            stream
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
        }
    } else {
        copy_body(&mut stream, &mut sink, length, &mut buf, bar, done_before).await?;
    }
    sink.file
        .sync_all()
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(Item {
        file: file_name,
        bytes: sink.bytes,
        sha256: hex_of(&sink.sha.finalize()),
    })
}

/// Copies `left` bytes (or to the end of the stream) from `stream` into `sink`.
async fn copy_body(
    stream: &mut BufReader<tokio::net::TcpStream>,
    sink: &mut Sink,
    mut left: Option<u64>,
    buf: &mut [u8],
    bar: &indicatif::ProgressBar,
    done_before: u64,
) -> Result<(), String> {
    loop {
        let want = left.map_or(buf.len() as u64, |l| l.min(buf.len() as u64)) as usize;
        if want == 0 {
            return Ok(());
        }
        let n = tokio::time::timeout(STREAM_IDLE_TIMEOUT, stream.read(&mut buf[..want]))
            .await
            .map_err(|_| format!("no bytes for {STREAM_IDLE_TIMEOUT:?}"))?
            .map_err(|e| format!("stream cut: {e}"))?;
        if n == 0 {
            return match left {
                None => Ok(()),
                Some(l) => Err(format!("stream cut with {l} bytes to go")),
            };
        }
        sink.put(&buf[..n])?;
        if let Some(l) = &mut left {
            *l -= n as u64;
        }
        bar.set_message(format!(
            "{:.1} MiB",
            (done_before + sink.bytes) as f64 / (1u64 << 20) as f64
        ));
    }
}

struct Sink {
    file: std::fs::File,
    sha: Sha256,
    bytes: u64,
}

impl Sink {
    fn put(&mut self, b: &[u8]) -> Result<(), String> {
        self.sha.update(b);
        self.bytes += b.len() as u64;
        self.file.write_all(b).map_err(|e| e.to_string())
    }
}
