//! `chatlog secret …`: end-to-end encrypted chats between two devices.
//!
//! What it owns: the flags and help of `secret key`, `secret start`, `secret list`,
//! `secret send` and `secret tail`, where this device's key file lives
//! (`--keys-dir`, default `$CHATLOG_SECRET_DIR` or `~/.config/chatlog/secret`; one file per
//! user and device, mode 0600), publishing the device's key when the server lacks it, and
//! printing opened messages. What it must not do: print or send a key, or acknowledge a
//! message it could not open (such a message is reported on stderr and left to expire on
//! the server).
//!
//! The device is the session's: the user id the server authenticated and the device id
//! the session was opened with (`login --device`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatlog_wire::client::{Client, ClientError, PushItem, SecretFlowError};
use chatlog_wire::proto::v1::{self, push};
use chatlog_wire::secret::{DeviceKeys, Opened, SecretError};
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::Printer;
use super::{CmdError, CmdResult, Conn, connect_with};

/// Default `--ttl` of `secret send`, in seconds. Why: a day covers a device that is off
/// overnight; the server's limit is a week.
pub const SECRET_TTL_S_DEFAULT: u64 = 24 * 3600;

/// `chatlog secret …`
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Show this device's secret-chat key fingerprint, creating and publishing the key
    /// if needed.
    ///
    /// --json: {"user_id": N, "device_id": "…", "public_key": "HEX", "file": "PATH"}
    Key(SecretConn),
    /// Start a secret chat with another device, given as USER_ID/DEVICE_ID (for example
    /// `65538/phone`). That device must have published its key (any `secret` command on
    /// it does). Prints the secret chat's id.
    ///
    /// --json: {"secret_chat_id": N, "peer_user_id": N, "peer_device_id": "…"}
    Start(SecretStartArgs),
    /// List this device's secret chats.
    ///
    /// --json: {"chats": [{"secret_chat_id": N, "peer_user_id": N, "peer_device_id": "…",
    /// "started_here": BOOL, "keys_here": BOOL}, …]}
    List(SecretConn),
    /// Seal and send a message in a secret chat.
    ///
    /// The server keeps it for the other device at most --ttl seconds, until that device
    /// acknowledges it. --self-destruct asks the reader's client to delete it that many
    /// seconds after reading.
    ///
    /// --json: {"secret_chat_id": N, "counter": N, "epoch": N, "expires_at_ms": N}
    Send(SecretSendArgs),
    /// Print the secret messages for this device as they arrive (first the ones that
    /// waited), and acknowledge each once printed: the server then erases it.
    ///
    /// Messages that fail to open (tampered, replayed, misrouted) are reported on stderr
    /// and not acknowledged. Stops on Ctrl-C or after --limit messages.
    ///
    /// --json: one object per message: {"secret_chat_id": N, "sender_user_id": N,
    /// "sender_device_id": "…", "counter": N, "epoch": N, "text": "…",
    /// "self_destruct_s": N, "destruct_at_ms": N|null, "sent_at_ms": N}
    Tail(SecretTailArgs),
}

/// The flags every `secret` command takes.
#[derive(Debug, Clone, Args)]
pub struct SecretConn {
    /// Where this device's key files live.
    #[arg(long, value_name = "DIR", env = "CHATLOG_SECRET_DIR")]
    keys_dir: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `secret start`.
#[derive(Debug, Args)]
pub struct SecretStartArgs {
    /// The other device: USER_ID/DEVICE_ID.
    #[arg(value_name = "USER_ID/DEVICE_ID")]
    peer: String,
    #[command(flatten)]
    common: SecretConn,
}

/// Flags of `secret send`.
#[derive(Debug, Args)]
pub struct SecretSendArgs {
    /// The secret chat's id (`secret start` and `secret list` print it).
    chat: u64,
    /// The text.
    text: String,
    /// Seconds the server keeps the message for an absent device (1 to 604800).
    #[arg(long, value_name = "SECS", default_value_t = SECRET_TTL_S_DEFAULT)]
    ttl: u64,
    /// Seconds after reading before the reader's client deletes it (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    self_destruct: u32,
    #[command(flatten)]
    common: SecretConn,
}

/// Flags of `secret tail`.
#[derive(Debug, Args)]
pub struct SecretTailArgs {
    /// Only this secret chat (default: all of this device's).
    chat: Option<u64>,
    /// Stop after this many messages.
    #[arg(long)]
    limit: Option<u64>,
    #[command(flatten)]
    common: SecretConn,
}

impl From<SecretFlowError> for CmdError {
    fn from(e: SecretFlowError) -> CmdError {
        match e {
            SecretFlowError::Client(c) => c.into(),
            SecretFlowError::Device(d) => d.into(),
        }
    }
}

impl From<SecretError> for CmdError {
    fn from(e: SecretError) -> CmdError {
        let code = match &e {
            SecretError::Tampered { .. }
            | SecretError::Replayed { .. }
            | SecretError::Misrouted(_)
            | SecretError::Epoch { .. } => "REFUSED_MESSAGE",
            SecretError::UnknownChat(_) => "NOT_FOUND",
            SecretError::BadKey(_) => "BAD_KEY",
            SecretError::TooLarge(_) => "TOO_LARGE",
            SecretError::Corrupt { .. } | SecretError::Io { .. } => "KEY_FILE",
        };
        CmdError::new(code, e.to_string())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn keys_dir(c: &SecretConn) -> PathBuf {
    if let Some(d) = &c.keys_dir {
        return d.clone();
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("chatlog").join("secret")
}

/// A device id as a file-name part: kept when plain, hex otherwise.
fn file_part(device: &str) -> String {
    if !device.is_empty()
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        device.to_string()
    } else {
        format!("x{}", hex(device.as_bytes()))
    }
}

/// Connects, finds this session's user and device, opens (or creates) the device's key
/// file and makes sure the server has its public key.
async fn open_device(c: &SecretConn) -> CmdResult<(Client, DeviceKeys)> {
    // Live: `secret tail` waits for `secret_message` pushes.
    let client = connect_with(&c.conn, true, true).await?;
    let info = client
        .server_info()
        .ok_or_else(|| CmdError::new("DISCONNECTED", "the connection dropped"))?;
    let sessions = client.list_sessions(v1::ListSessionsRequest {}).await?;
    let device = sessions
        .sessions
        .iter()
        .find(|s| s.current)
        .map(|s| s.device_id.clone())
        .ok_or_else(|| CmdError::new("UNAUTHENTICATED", "this session is not listed"))?;
    let path = keys_dir(c).join(format!("{}-{}.key", info.user_id, file_part(&device)));
    let keys = DeviceKeys::load_or_create(path, info.user_id, &device)?;
    let published = client
        .secret_get_key(v1::SecretGetKeyRequest {
            user_id: info.user_id,
            device_id: device.clone(),
        })
        .await;
    let up_to_date = matches!(&published, Ok(k) if k.public_key[..] == keys.public_key());
    if !up_to_date {
        match published {
            Ok(_)
            | Err(ClientError::Server {
                code: v1::ErrorCode::NotFound,
                ..
            }) => {
                client.secret_publish(&keys).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((client, keys))
}

fn parse_peer(s: &str) -> CmdResult<(u64, String)> {
    let bad = || {
        CmdError::new(
            "BAD_REQUEST",
            format!("{s:?} is not USER_ID/DEVICE_ID (for example 65538/phone)"),
        )
    };
    let (user, device) = s.split_once('/').ok_or_else(bad)?;
    let user: u64 = user.parse().map_err(|_| bad())?;
    if device.is_empty() {
        return Err(bad());
    }
    Ok((user, device.to_string()))
}

/// Runs one `secret` command.
pub async fn run(cmd: SecretCommand) -> CmdResult {
    match cmd {
        SecretCommand::Key(c) => {
            let (_, keys) = open_device(&c).await?;
            let key = hex(&keys.public_key());
            Printer::new(&c.conn).result(
                &json!({"user_id": keys.user, "device_id": keys.device,
                        "public_key": key, "file": keys.path().display().to_string()}),
                || {
                    format!(
                        "user {} device {}: public key {key} ({})",
                        keys.user,
                        keys.device,
                        keys.path().display()
                    )
                },
            );
            Ok(())
        }
        SecretCommand::Start(a) => {
            let (user, device) = parse_peer(&a.peer)?;
            let (client, mut keys) = open_device(&a.common).await?;
            let chat = client.secret_start(&mut keys, user, &device).await?;
            Printer::new(&a.common.conn).result(
                &json!({"secret_chat_id": chat, "peer_user_id": user, "peer_device_id": device}),
                || format!("secret chat {chat} with user {user} device {device}"),
            );
            Ok(())
        }
        SecretCommand::List(c) => {
            let (client, mut keys) = open_device(&c).await?;
            client.secret_refresh_chats(&mut keys).await?;
            let list = client.secret_list(v1::SecretListRequest {}).await?;
            let rows: Vec<_> = list
                .chats
                .iter()
                .map(|s| {
                    let started_here =
                        s.initiator_user_id == keys.user && s.initiator_device_id == keys.device;
                    let (pu, pd) = if started_here {
                        (s.responder_user_id, s.responder_device_id.clone())
                    } else {
                        (s.initiator_user_id, s.initiator_device_id.clone())
                    };
                    (
                        s.secret_chat_id,
                        pu,
                        pd,
                        started_here,
                        keys.chat(s.secret_chat_id).is_some(),
                    )
                })
                .collect();
            let value = json!({"chats": rows.iter().map(|(c, u, d, s, k)| json!({
                "secret_chat_id": c, "peer_user_id": u, "peer_device_id": d,
                "started_here": s, "keys_here": k})).collect::<Vec<_>>()});
            Printer::new(&c.conn).result(&value, || {
                rows.iter()
                    .map(|(c, u, d, s, k)| {
                        format!(
                            "{c}\twith user {u} device {d}{}{}",
                            if *s { " (started here)" } else { "" },
                            if *k { "" } else { " (no keys on this device)" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        SecretCommand::Send(a) => {
            if a.ttl == 0 {
                return Err(CmdError::new(
                    "BAD_REQUEST",
                    "--ttl must be at least 1 second",
                ));
            }
            let (client, mut keys) = open_device(&a.common).await?;
            let (counter, r) = client
                .secret_send(
                    &mut keys,
                    a.chat,
                    &a.text,
                    a.ttl.saturating_mul(1000),
                    a.self_destruct,
                    now_ms(),
                )
                .await?;
            let epoch = keys.chat(a.chat).map_or(0, |k| k.send_epoch());
            Printer::new(&a.common.conn).result(
                &json!({"secret_chat_id": a.chat, "counter": counter, "epoch": epoch,
                        "expires_at_ms": r.expires_at_ms}),
                || format!("sent #{counter} in secret chat {}", a.chat),
            );
            Ok(())
        }
        SecretCommand::Tail(a) => tail(a).await,
    }
}

fn print_opened(p: &Printer, o: &Opened) {
    let destruct = o.destruct_at_ms(now_ms());
    p.result(
        &json!({"secret_chat_id": o.chat, "sender_user_id": o.sender_user,
                "sender_device_id": o.sender_device, "counter": o.counter, "epoch": o.epoch,
                "text": o.text, "self_destruct_s": o.self_destruct_s,
                "destruct_at_ms": destruct, "sent_at_ms": o.sent_at_ms}),
        || {
            let timer = if o.self_destruct_s > 0 {
                format!(" (self-destructs {}s after reading)", o.self_destruct_s)
            } else {
                String::new()
            };
            format!(
                "[secret {}] {}/{} #{}: {}{timer}",
                o.chat, o.sender_user, o.sender_device, o.counter, o.text
            )
        },
    );
}

/// Opens, prints and acknowledges one message. Returns true if it was printed.
async fn handle(
    client: &Client,
    keys: &mut DeviceKeys,
    p: &Printer,
    m: &v1::SecretMessage,
) -> CmdResult<bool> {
    match client.secret_receive(keys, m).await {
        Ok(o) => {
            print_opened(p, &o);
            client
                .secret_ack(v1::SecretAckRequest {
                    secret_chat_id: o.chat,
                    counter: o.counter,
                })
                .await?;
            Ok(true)
        }
        Err(SecretFlowError::Device(e)) => {
            // Not acknowledged: it expires on the server.
            eprintln!("refused a secret message: {e}");
            Ok(false)
        }
        Err(SecretFlowError::Client(e)) => Err(e.into()),
    }
}

async fn tail(a: SecretTailArgs) -> CmdResult {
    let (client, mut keys) = open_device(&a.common).await?;
    let mut pushes = client
        .pushes()
        .expect("a new client's push receiver is not taken yet");
    let p = Printer::new(&a.common.conn);
    let limit = a.limit.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    if limit == 0 {
        return Ok(());
    }
    // What waited, page by page (each page is acknowledged before the next is asked).
    loop {
        let page = client
            .secret_pending(v1::SecretPendingRequest {
                secret_chat_id: a.chat.unwrap_or(0),
            })
            .await?;
        let mut progressed = false;
        for m in &page.messages {
            if handle(&client, &mut keys, &p, m).await? {
                progressed = true;
                printed += 1;
                if printed >= limit {
                    return Ok(());
                }
            }
        }
        if !page.more || !progressed {
            break;
        }
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ping = tokio::time::interval(Duration::from_secs(10));
    ping.tick().await;
    loop {
        let item = tokio::select! {
            item = pushes.recv() => item,
            _ = &mut ctrl_c => return Ok(()),
            _ = ping.tick() => {
                // Keeps the connection (and its device's registration) alive.
                client.ping(v1::PingRequest { nonce: 1 }).await?;
                continue;
            }
        };
        match item {
            None => {
                return Err(CmdError::new(
                    "DISCONNECTED",
                    "the connection dropped; run `secret tail` again (waiting messages are kept)",
                ));
            }
            Some(PushItem::Push {
                push: push::Kind::SecretMessage(m),
                ..
            }) => {
                if a.chat.is_some_and(|c| c != m.secret_chat_id) {
                    continue;
                }
                // Delivered twice (pushed while the waiting ones were fetched): already
                // printed and acknowledged.
                if keys
                    .chat(m.secret_chat_id)
                    .is_some_and(|k| m.counter <= k.recv_counter())
                {
                    continue;
                }
                if handle(&client, &mut keys, &p, &m).await? {
                    printed += 1;
                    if printed >= limit {
                        return Ok(());
                    }
                }
            }
            Some(_) => {}
        }
    }
}
