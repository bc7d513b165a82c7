//! The `chatlog` binary's client commands: `user create`, `login`, `sessions`, `chat …`,
//! `send`, `history`, `tail`, `edit`, `delete`, `react`, `pin`, `read`, `unread`,
//! `secret …` (`secret.rs`), `upload`, `download` (the last two in `media.rs`).
//!
//! What it owns: the flags and help text of these commands, turning them into requests
//! through `chatlog_wire::Client`, and printing the answers, for people (one line per
//! item) or, with `--json`, as JSON objects whose shapes scripts rely on (the help of each
//! command states its shape; fields are only ever added). What it must not do: decide
//! anything the server decides (permissions, limits beyond what a flag's type says).
//!
//! Errors: a refused request, an unreachable server or a missing token is printed by
//! `main` as `error: CODE: message` on stderr with exit status 1; `CODE` is the
//! protocol's error code without its `ERROR_CODE_` prefix (`PERMISSION_DENIED`, …), or
//! one of the client's own: `NO_TOKEN`, `CONNECT_FAILED`, `TIMEOUT`, `DISCONNECTED`,
//! `PROTOCOL`. Usage errors exit with status 2 (clap).

mod media;
pub(crate) mod output;
mod secret;
mod tail;

use std::fmt;
use std::time::Duration;

use chatlog_wire::client::{Client, ClientError, ClientOptions};
use chatlog_wire::limits::PAGE_ITEMS_MAX;
use chatlog_wire::proto::v1;
use chatlog_wire::proto::v1::request::Kind as Req;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::cli::CliError;
use output::{Printer, chat_kind_name, role_name};

/// The client name sent in every handshake.
const CLIENT_NAME: &str = concat!("chatlog-cli/", env!("CARGO_PKG_VERSION"));

/// The end of `chatlog --help`: what every client command shares.
pub const AFTER_HELP: &str = "\
Client commands (user, login, sessions, chat, send, history, tail, edit, delete, react,
pin, read, unread, bot, secret, upload, download) take --server ADDR (or CHATLOG_SERVER; default 127.0.0.1:7400),
--token TOKEN (or CHATLOG_TOKEN; the session token `user create` and `login` print)
and --json (JSON for scripts; its shape is in each command's --help).
A refused request exits with status 1 and prints `error: CODE: message` on stderr;
a usage error exits with status 2.";

/// Default for `--device` of `user create` and `login`.
pub const DEFAULT_DEVICE: &str = "cli";

/// Default for `history --limit`.
const HISTORY_LIMIT_DEFAULT: u32 = 50;

/// Flags every client command takes.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The server's client address (what `chatlog serve` prints as `clients: ADDR`).
    #[arg(long, value_name = "ADDR", env = "CHATLOG_SERVER", default_value = crate::serve::DEFAULT_LISTEN)]
    pub server: String,
    /// Session token (from `chatlog user create` or `chatlog login`).
    #[arg(long, env = "CHATLOG_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON for scripts instead of lines for people.
    #[arg(long)]
    pub json: bool,
}

/// The client commands, flattened into `chatlog`'s top level.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create users (dev mode) and log them in.
    #[command(subcommand)]
    User(UserCommand),
    /// Log in with a user id and login token; prints a session token.
    ///
    /// --json: {"user_id": N, "session_id": N, "token": "SESSION_TOKEN", "device_id": "…"}
    Login(LoginArgs),
    /// List or revoke your sessions (one per logged-in device).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Create chats, list them, manage members.
    #[command(subcommand)]
    Chat(ChatCommand),
    /// Post a message to a chat.
    ///
    /// Without --client-id a random non-zero id is picked and printed; running the same
    /// command again with `--client-id ID` is idempotent: the server posts nothing new and
    /// returns the original seq (with "deduplicated": true).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N, "client_id": N,
    /// "deduplicated": BOOL}
    Send(SendArgs),
    /// Read a page of a chat's log.
    ///
    /// Without --from: the newest --limit events. With --from SEQ: --limit events from SEQ
    /// on (or, with --backward, from SEQ back). Events are always printed oldest first.
    /// Edits, deletions and reactions are events of their own, later in the log.
    ///
    /// --json: {"events": [EVENT, …], "head_seq": N, "has_more": BOOL} where EVENT is
    /// {"chat_id": N, "seq": N, "kind": "message", "sender": USER_ID, "timestamp_ms": N,
    /// "text": "…", "client_id": N, "erased": BOOL, …}. Kinds: chat_created, message,
    /// edit, delete, reaction, pin, member_joined, member_left, member_removed,
    /// member_banned, member_unbanned, role_changed, unknown; edit, delete, reaction and
    /// pin carry "target_seq", membership events "user_id".
    History(HistoryArgs),
    /// Follow a chat live: print its events as they are committed.
    ///
    /// Starts at --from SEQ, or after the current head without it. Survives dropped
    /// connections: it reconnects and resumes from the next seq, without gaps or
    /// duplicates. Stops on Ctrl-C, or after --limit events.
    ///
    /// --json: one EVENT object (as in `history --json`) per line.
    Tail(TailArgs),
    /// Replace the text of one of your messages.
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N} (seq of the edit event)
    Edit(EditArgs),
    /// Delete a message (yours, or any as an admin): its body is erased.
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N} (seq of the delete event)
    Delete(TargetArgs),
    /// Add (or with --remove take back) your reaction to a message.
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N} (seq of the reaction event)
    React(ReactArgs),
    /// Pin (or with --unpin unpin) a message.
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N} (seq of the pin event)
    Pin(PinArgs),
    /// Mark a chat read up to SEQ (a marker never moves backward).
    ///
    /// --json: {"chat_id": N, "read_seq": N, "unread_count": N}
    Read(TargetArgs),
    /// Unread counts: of the chats given, or of every chat with unread messages.
    ///
    /// --json: {"counts": [{"chat_id": N, "read_seq": N, "head_seq": N,
    /// "unread_count": N}, …]}
    Unread(UnreadArgs),
    /// What changed since a device last looked: per chat, the events after the device's
    /// position (a bounded page), the head, the read marker and the unread count.
    ///
    /// Positions are CHAT=SEQ (the last seq the device holds); with none, every chat of
    /// yours is answered from its read marker (one page of chats; --after pages on).
    /// A chat whose gap is longer than one answer says "too_long": page the rest with
    /// `history CHAT --from SEQ`.
    ///
    /// --json: {"chats": [{"chat_id": N, "head_seq": N, "read_seq": N,
    /// "unread_count": N, "too_long": B, "not_member": B, "events": [EVENT, …]}, …],
    /// "has_more": B}
    Sync(SyncArgs),
    /// Secret chats: end-to-end encrypted between two devices (`secret start`, `send`,
    /// `tail`, `list`, `key`). Keys stay on this device (--keys-dir).
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Upload a file (up to 4 GiB) in checked parts; prints its media id.
    ///
    /// Interrupted (Ctrl-C, a dropped connection, a server restart)? Run the same command
    /// again: the upload resumes with the parts the server lacks (its id is kept under
    /// --resume-dir until it finishes). A file already stored is not stored twice. With
    /// --chat it also posts a message carrying the file (and --caption as its text).
    ///
    /// --json: {"media_id": "64 hex digits", "size_bytes": N, "mime_type": "…",
    /// "file_name": "…", "deduplicated": BOOL} plus, with --chat, "chat_id", "seq" and
    /// "client_id".
    Upload(media::UploadArgs),
    /// Download a stored file by media id (you must have uploaded it or be a member of a
    /// chat it was sent to).
    ///
    /// Every chunk is checked against the CRC-32 the server stored with that part at
    /// upload; --verify-sha256 also checks the whole file against the media id (its
    /// SHA-256: slower, it catches a server that sends wrong bytes with their CRC).
    /// Interrupted? Run the same command again: it resumes from FILE.part, and then the
    /// whole file's SHA-256 is always checked (the kept bytes are checked by nothing
    /// else). A file that fails a check is reported and never renamed into place.
    ///
    /// --json: {"media_id": "…", "path": "…", "size_bytes": N, "mime_type": "…",
    /// "file_name": "…", "resumed_from": N}
    Download(media::DownloadArgs),
}

/// `chatlog user …`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user and log in as them (the server must run in dev mode, its default).
    ///
    /// The server answers user creation with a login token; this command then logs in
    /// with it from device --device and prints the session token that every other
    /// command takes with --token or CHATLOG_TOKEN. Keep the login token to log in from
    /// other devices with `chatlog login`.
    ///
    /// --json: {"user_id": N, "name": "…", "token": "SESSION_TOKEN", "login_token": "…",
    /// "session_id": N, "device_id": "…"}
    Create(UserCreateArgs),
}

/// `chatlog sessions …`
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List your live sessions; "current" marks the one of --token.
    ///
    /// --json: {"sessions": [{"session_id": N, "device_id": "…", "device_name": "…",
    /// "created_at_ms": N, "current": BOOL}, …]}
    List(ConnOnly),
    /// End one of your sessions (your own current one logs you out).
    ///
    /// --json: {"revoked": SESSION_ID}
    Revoke(RevokeArgs),
}

/// `chatlog chat …`
#[derive(Debug, Subcommand)]
pub enum ChatCommand {
    /// Create a group, channel or direct chat; you become its owner.
    ///
    /// group, channel: NAME is the title (required), --members the initial members.
    ///
    /// direct: a chat with exactly one other user, given by --members ID or, without
    /// --members, as NAME (`chat create --kind direct 65538`); direct chats have no
    /// title. Creating a direct chat that exists returns the existing one.
    ///
    /// --json: {"chat_id": N, "seq": 1, "kind": "group"}
    Create(ChatCreateArgs),
    /// List your chats with head seq, read marker and unread count.
    ///
    /// --json: {"chats": [{"chat_id": N, "kind": "group", "title": "…", "role": "owner",
    /// "head_seq": N, "read_seq": N, "unread_count": N, "member_count": N}, …],
    /// "has_more": BOOL}
    List(ChatListArgs),
    /// List a chat's members and their roles.
    ///
    /// --json: {"members": [{"user_id": N, "role": "member", "joined_seq": N}, …],
    /// "has_more": BOOL}
    Members(ChatMembersArgs),
    /// Add a user to a group or channel (admin).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N} (seq of the membership event)
    Invite(ChatUserArgs),
    /// Remove a member from a group or channel (admin).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N}
    Remove(ChatUserArgs),
    /// Leave a group or channel (the owner cannot).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N}
    Leave(ChatArgs),
    /// Ban a user, removing them if a member (admin).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N}
    Ban(ChatUserArgs),
    /// Lift a ban (admin).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N}
    Unban(ChatUserArgs),
    /// Join a channel (groups are joined only by invitation).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N}
    Join(ChatArgs),
    /// Make a member an admin or a plain member again (owner).
    ///
    /// --json: {"chat_id": N, "seq": N, "timestamp_ms": N}
    Role(ChatRoleArgs),
}

/// Only the common flags.
#[derive(Debug, Args)]
pub struct ConnOnly {
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `user create`.
#[derive(Debug, Args)]
pub struct UserCreateArgs {
    /// Unique user name: 1 to 32 bytes of a-z, 0-9 and _.
    name: String,
    /// Device id of the session opened after creation.
    #[arg(long, default_value = DEFAULT_DEVICE)]
    device: String,
    /// Device name for people (default: "chatlog CLI").
    #[arg(long)]
    device_name: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The user's id.
    user_id: u64,
    /// The login token (`user create` prints it as "login_token").
    login_token: String,
    /// This device's id; logging in again from the same device replaces its session.
    #[arg(long, default_value = DEFAULT_DEVICE)]
    device: String,
    /// Device name for people (default: "chatlog CLI").
    #[arg(long)]
    device_name: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `sessions revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The session to end (see `sessions list`).
    session_id: u64,
    #[command(flatten)]
    conn: Conn,
}

/// A chat's kind, as flags and output name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Many members who all post.
    Group,
    /// Only admins post; members read.
    Channel,
    /// Two users.
    Direct,
}

/// A role `chat role` can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A plain member.
    Member,
    /// Invites, removes, bans, pins, deletes others' messages, posts in channels.
    Admin,
}

/// Flags of `chat create`.
#[derive(Debug, Args)]
pub struct ChatCreateArgs {
    /// Title of a group or channel; for a direct chat, the other user's id (when
    /// --members is not given).
    name: Option<String>,
    /// The chat's kind.
    #[arg(long, value_enum, default_value = "group")]
    kind: KindArg,
    /// Initial members besides you, as user ids: `--members 65538,65539`.
    #[arg(long, value_delimiter = ',', value_name = "ID,ID")]
    members: Vec<u64>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `chat list`.
#[derive(Debug, Args)]
pub struct ChatListArgs {
    /// Start after this chat id.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Most chats to print (default: all).
    #[arg(long)]
    limit: Option<u32>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `chat members`.
#[derive(Debug, Args)]
pub struct ChatMembersArgs {
    /// The chat.
    chat: u64,
    /// Start after this user id.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Most members to print (default: all).
    #[arg(long)]
    limit: Option<u32>,
    #[command(flatten)]
    conn: Conn,
}

/// A chat.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The chat.
    chat: u64,
    #[command(flatten)]
    conn: Conn,
}

/// A chat and a user.
#[derive(Debug, Args)]
pub struct ChatUserArgs {
    /// The chat.
    chat: u64,
    /// The user.
    user: u64,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `chat role`.
#[derive(Debug, Args)]
pub struct ChatRoleArgs {
    /// The chat.
    chat: u64,
    /// The member.
    user: u64,
    /// Their new role.
    #[arg(value_enum)]
    role: RoleArg,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The chat.
    chat: u64,
    /// The text (at most 16 KiB).
    text: String,
    /// Client message id: repeating a send with the same id posts nothing new.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    client_id: Option<u64>,
    /// The seq of the message this one replies to.
    #[arg(long, value_name = "SEQ")]
    reply_to: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The chat.
    chat: u64,
    /// First seq to print (inclusive); without it, the newest events.
    #[arg(long, value_name = "SEQ")]
    from: Option<u64>,
    /// Most events to print (pages of 100 are fetched as needed).
    #[arg(long, default_value_t = HISTORY_LIMIT_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Go back from --from instead of forward.
    #[arg(long)]
    backward: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The chat.
    chat: u64,
    /// First seq to print; without it, only events after the current head.
    #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..))]
    from: Option<u64>,
    /// Exit after printing this many events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `edit`.
#[derive(Debug, Args)]
pub struct EditArgs {
    /// The chat.
    chat: u64,
    /// The message's seq.
    seq: u64,
    /// The new text.
    text: String,
    #[command(flatten)]
    conn: Conn,
}

/// A chat and a seq.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The chat.
    chat: u64,
    /// The message's seq (for `read`: the highest seq read).
    seq: u64,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `react`.
#[derive(Debug, Args)]
pub struct ReactArgs {
    /// The chat.
    chat: u64,
    /// The message's seq.
    seq: u64,
    /// The reaction, typically one emoji (at most 32 bytes).
    emoji: String,
    /// Take the reaction back instead of adding it.
    #[arg(long)]
    remove: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `pin`.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// The chat.
    chat: u64,
    /// The message's seq.
    seq: u64,
    /// Unpin instead of pinning.
    #[arg(long)]
    unpin: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Positions as CHAT=SEQ (the last seq held; 0 for none).
    positions: Vec<String>,
    /// Most events per chat (1 to 100; default 100).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// With no positions: start after this chat id.
    #[arg(long, default_value_t = 0)]
    after: u64,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `unread`.
#[derive(Debug, Args)]
pub struct UnreadArgs {
    /// Chats to count (default: every chat of yours with unread messages).
    chats: Vec<u64>,
    #[command(flatten)]
    conn: Conn,
}

/// A failed client command: printed by `main` as `error: CODE: message`.
#[derive(Debug)]
pub struct CmdError {
    /// The protocol's error code without `ERROR_CODE_`, or one of the client's own.
    pub code: String,
    /// For people.
    pub message: String,
}

impl CmdError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        CmdError {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CmdError {}

impl From<ClientError> for CmdError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server { code, message, .. } => CmdError {
                code: code
                    .as_str_name()
                    .trim_start_matches("ERROR_CODE_")
                    .to_owned(),
                message,
            },
            ClientError::Timeout => CmdError::new("TIMEOUT", e.to_string()),
            ClientError::Disconnected => CmdError::new("DISCONNECTED", e.to_string()),
            ClientError::Protocol(m) => CmdError::new("PROTOCOL", m),
            ClientError::Encode(inner) => CmdError::new("TOO_LARGE", inner.to_string()),
            ClientError::Io(inner) => CmdError::new("CONNECT_FAILED", inner.to_string()),
            ClientError::LocalFile { .. } => CmdError::new("LOCAL_FILE", e.to_string()),
        }
    }
}

pub(crate) type CmdResult<T = ()> = Result<T, CmdError>;

/// Runs one client command on its own single-threaded runtime.
pub fn run(cmd: ClientCommand) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(dispatch(cmd))
        .map_err(|e| Box::new(e) as CliError)
}

/// Connects to `conn.server`, authenticated when a token is given, without live pushes:
/// a command sends and asks, and a one-shot command's connection must not make its user
/// online (`tail` follows a chat with a subscription, which works either way).
pub(crate) async fn connect(conn: &Conn, need_token: bool) -> CmdResult<Client> {
    connect_with(conn, need_token, false).await
}

/// [`connect`], choosing whether the server pushes live events (`secret tail` waits for
/// live `secret_message` pushes).
pub(crate) async fn connect_with(
    conn: &Conn,
    need_token: bool,
    live_pushes: bool,
) -> CmdResult<Client> {
    let token = conn.token.clone().filter(|t| !t.is_empty());
    if need_token && token.is_none() {
        return Err(CmdError::new(
            "NO_TOKEN",
            "this command needs a session token: pass --token or set CHATLOG_TOKEN \
             (`chatlog user create` and `chatlog login` print one)",
        ));
    }
    let options = ClientOptions {
        client_name: CLIENT_NAME.to_owned(),
        token,
        live_pushes,
        ..ClientOptions::default()
    };
    match Client::connect(&conn.server, options).await {
        Ok(client) => Ok(client),
        Err(ClientError::Io(e)) => Err(CmdError::new(
            "CONNECT_FAILED",
            format!("cannot connect to {}: {e}", conn.server),
        )),
        Err(ClientError::Timeout) => Err(CmdError::new(
            "CONNECT_FAILED",
            format!(
                "no answer from {} within {:?}",
                conn.server,
                chatlog_wire::client::CONNECT_TIMEOUT
            ),
        )),
        Err(ClientError::Disconnected) => Err(CmdError::new(
            "CONNECT_FAILED",
            format!(
                "{} closed the connection during the handshake (is it a chatlog server?)",
                conn.server
            ),
        )),
        Err(e @ ClientError::Server { .. }) => {
            let mut e = CmdError::from(e);
            if e.code == "UNAUTHENTICATED" {
                e.message = format!(
                    "the session token was refused ({}); log in again",
                    e.message
                );
            }
            Err(e)
        }
        Err(e) => Err(e.into()),
    }
}

fn ack_json(a: &v1::EventAck) -> Value {
    json!({"chat_id": a.chat_id, "seq": a.seq, "timestamp_ms": a.timestamp_ms})
}

/// Prints an `EventAck`: `what` says what happened, for people.
/// Sends a request answered with an `EventAck` and prints it (`what` for people).
async fn ack_command(conn: &Conn, req: Req, what: &str) -> CmdResult {
    let c = connect(conn, true).await?;
    let ack = match c.call(req).await? {
        v1::response::Kind::EventAck(ack) => ack,
        other => {
            return Err(
                ClientError::Protocol(format!("expected an event ack, got {other:?}")).into(),
            );
        }
    };
    print_ack(&Printer::new(conn), &ack, what);
    Ok(())
}

fn print_ack(p: &Printer, a: &v1::EventAck, what: &str) {
    p.result(&ack_json(a), || {
        format!("{what}: event #{} in chat {}", a.seq, a.chat_id)
    });
}

fn device_name(name: &Option<String>) -> String {
    name.clone().unwrap_or_else(|| "chatlog CLI".to_owned())
}

async fn dispatch(cmd: ClientCommand) -> CmdResult {
    match cmd {
        ClientCommand::User(UserCommand::Create(a)) => user_create(a).await,
        ClientCommand::Login(a) => login(a).await,
        ClientCommand::Sessions(c) => sessions(c).await,
        ClientCommand::Chat(c) => chat(c).await,
        ClientCommand::Send(a) => send(a).await,
        ClientCommand::Upload(a) => media::upload(a).await,
        ClientCommand::Download(a) => media::download(a).await,
        ClientCommand::History(a) => history(a).await,
        ClientCommand::Tail(a) => tail::run(a).await,
        ClientCommand::Secret(c) => secret::run(c).await,
        ClientCommand::Edit(a) => {
            let c = connect(&a.conn, true).await?;
            let ack = c
                .edit_message(v1::EditMessageRequest {
                    chat_id: a.chat,
                    seq: a.seq,
                    text: a.text,
                })
                .await?;
            print_ack(&Printer::new(&a.conn), &ack, &format!("edited #{}", a.seq));
            Ok(())
        }
        ClientCommand::Delete(a) => {
            let c = connect(&a.conn, true).await?;
            let ack = c
                .delete_message(v1::DeleteMessageRequest {
                    chat_id: a.chat,
                    seq: a.seq,
                })
                .await?;
            print_ack(&Printer::new(&a.conn), &ack, &format!("deleted #{}", a.seq));
            Ok(())
        }
        ClientCommand::React(a) => {
            let c = connect(&a.conn, true).await?;
            let change = if a.remove {
                v1::ReactionChange::Remove
            } else {
                v1::ReactionChange::Add
            };
            let ack = c
                .react(v1::ReactRequest {
                    chat_id: a.chat,
                    seq: a.seq,
                    reaction: a.emoji.clone(),
                    change: change.into(),
                })
                .await?;
            let what = if a.remove {
                format!("took back {} from #{}", a.emoji, a.seq)
            } else {
                format!("reacted {} to #{}", a.emoji, a.seq)
            };
            print_ack(&Printer::new(&a.conn), &ack, &what);
            Ok(())
        }
        ClientCommand::Pin(a) => {
            let c = connect(&a.conn, true).await?;
            let change = if a.unpin {
                v1::PinChange::Unpin
            } else {
                v1::PinChange::Pin
            };
            let ack = c
                .pin(v1::PinRequest {
                    chat_id: a.chat,
                    seq: a.seq,
                    change: change.into(),
                })
                .await?;
            let what = if a.unpin { "unpinned" } else { "pinned" };
            print_ack(&Printer::new(&a.conn), &ack, &format!("{what} #{}", a.seq));
            Ok(())
        }
        ClientCommand::Read(a) => {
            let c = connect(&a.conn, true).await?;
            let r = c
                .mark_read(v1::MarkReadRequest {
                    chat_id: a.chat,
                    seq: a.seq,
                })
                .await?;
            Printer::new(&a.conn).result(
                &json!({"chat_id": r.chat_id, "read_seq": r.read_seq, "unread_count": r.unread_count}),
                || {
                    format!(
                        "chat {}: read up to #{}, {} unread",
                        r.chat_id, r.read_seq, r.unread_count
                    )
                },
            );
            Ok(())
        }
        ClientCommand::Sync(a) => {
            let mut chats = Vec::with_capacity(a.positions.len());
            for p in &a.positions {
                let parsed = p
                    .split_once('=')
                    .and_then(|(c, s)| Some((c.parse().ok()?, s.parse().ok()?)));
                let Some((chat_id, last_seq)) = parsed else {
                    return Err(CmdError {
                        code: "USAGE".into(),
                        message: format!("position {p:?} is not CHAT=SEQ"),
                    });
                };
                chats.push(v1::ChatPosition { chat_id, last_seq });
            }
            let c = connect(&a.conn, true).await?;
            let r = c
                .sync(v1::SyncRequest {
                    chats,
                    events_per_chat_max: a.limit,
                    after_chat_id: a.after,
                })
                .await?;
            let p = Printer::new(&a.conn);
            let chats: Vec<Value> = r
                .chats
                .iter()
                .map(|d| {
                    json!({"chat_id": d.chat_id, "head_seq": d.head_seq,
                           "read_seq": d.read_seq, "unread_count": d.unread_count,
                           "too_long": d.too_long, "not_member": d.not_member,
                           "events": d.events.iter().map(output::event_json).collect::<Vec<_>>()})
                })
                .collect();
            p.result(&json!({ "chats": chats, "has_more": r.has_more }), || {
                if r.chats.is_empty() {
                    return "nothing new".to_owned();
                }
                let mut out = Vec::new();
                for d in &r.chats {
                    if d.not_member {
                        out.push(format!("chat {}: no longer a member", d.chat_id));
                        continue;
                    }
                    out.push(format!(
                        "chat {}: head #{}, read #{}, {} unread{}",
                        d.chat_id,
                        d.head_seq,
                        d.read_seq,
                        d.unread_count,
                        if d.too_long {
                            ", more than one page behind"
                        } else {
                            ""
                        }
                    ));
                    out.extend(
                        d.events
                            .iter()
                            .map(|e| format!("  {}", output::event_line(e))),
                    );
                }
                out.join("\n")
            });
            Ok(())
        }
        ClientCommand::Unread(a) => {
            let c = connect(&a.conn, true).await?;
            let r = c
                .get_unread_counts(v1::GetUnreadCountsRequest { chat_ids: a.chats })
                .await?;
            let p = Printer::new(&a.conn);
            let counts: Vec<Value> = r
                .counts
                .iter()
                .map(|u| {
                    json!({"chat_id": u.chat_id, "read_seq": u.read_seq,
                           "head_seq": u.head_seq, "unread_count": u.unread_count})
                })
                .collect();
            p.result(&json!({ "counts": counts }), || {
                if r.counts.is_empty() {
                    return "nothing unread".to_owned();
                }
                r.counts
                    .iter()
                    .map(|u| {
                        format!(
                            "chat {}: {} unread (read #{} of #{})",
                            u.chat_id, u.unread_count, u.read_seq, u.head_seq
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
    }
}

async fn user_create(a: UserCreateArgs) -> CmdResult {
    let c = connect(&a.conn, false).await?;
    let created = c
        .create_user(v1::CreateUserRequest {
            name: a.name.clone(),
        })
        .await?;
    if created.login_token.is_empty() {
        return Err(CmdError::new(
            "UNAUTHENTICATED",
            format!(
                "user {} was created but the server returned no login token \
                 (it is not in dev mode); log in with a delivered code: chatlog login {} CODE",
                created.user_id, created.user_id
            ),
        ));
    }
    let login = c
        .login(v1::LoginRequest {
            user_id: created.user_id,
            login_token: created.login_token.clone(),
            device_id: a.device.clone(),
            device_name: device_name(&a.device_name),
        })
        .await?;
    Printer::new(&a.conn).result(
        &json!({
            "user_id": created.user_id,
            "name": a.name,
            "token": login.session_token,
            "login_token": created.login_token,
            "session_id": login.session_id,
            "device_id": a.device,
        }),
        || {
            format!(
                "created user {} ({})\nsession token: {}\n  (use it with --token or: export CHATLOG_TOKEN={})\n\
                 login token: {}\n  (for `chatlog login {} LOGIN_TOKEN` from other devices)",
                a.name,
                created.user_id,
                login.session_token,
                login.session_token,
                created.login_token,
                created.user_id
            )
        },
    );
    Ok(())
}

async fn login(a: LoginArgs) -> CmdResult {
    let c = connect(&a.conn, false).await?;
    let login = c
        .login(v1::LoginRequest {
            user_id: a.user_id,
            login_token: a.login_token,
            device_id: a.device.clone(),
            device_name: device_name(&a.device_name),
        })
        .await?;
    Printer::new(&a.conn).result(
        &json!({
            "user_id": login.user_id,
            "session_id": login.session_id,
            "token": login.session_token,
            "device_id": a.device,
        }),
        || {
            format!(
                "logged in as user {} (session {})\nsession token: {}\n  (use it with --token or: export CHATLOG_TOKEN={})",
                login.user_id, login.session_id, login.session_token, login.session_token
            )
        },
    );
    Ok(())
}

async fn sessions(cmd: SessionsCommand) -> CmdResult {
    match cmd {
        SessionsCommand::List(a) => {
            let c = connect(&a.conn, true).await?;
            let r = c.list_sessions(v1::ListSessionsRequest {}).await?;
            let list: Vec<Value> = r
                .sessions
                .iter()
                .map(|s| {
                    json!({"session_id": s.session_id, "device_id": s.device_id,
                           "device_name": s.device_name, "created_at_ms": s.created_at_ms,
                           "current": s.current})
                })
                .collect();
            Printer::new(&a.conn).result(&json!({ "sessions": list }), || {
                r.sessions
                    .iter()
                    .map(|s| {
                        format!(
                            "{} session {}  device {} ({})  since {}",
                            if s.current { "*" } else { " " },
                            s.session_id,
                            s.device_id,
                            s.device_name,
                            output::date_time(s.created_at_ms)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        SessionsCommand::Revoke(a) => {
            let c = connect(&a.conn, true).await?;
            c.revoke_session(v1::RevokeSessionRequest {
                session_id: a.session_id,
            })
            .await?;
            Printer::new(&a.conn).result(&json!({ "revoked": a.session_id }), || {
                format!("revoked session {}", a.session_id)
            });
            Ok(())
        }
    }
}

async fn chat(cmd: ChatCommand) -> CmdResult {
    match cmd {
        ChatCommand::Create(a) => chat_create(a).await,
        ChatCommand::List(a) => chat_list(a).await,
        ChatCommand::Members(a) => chat_members(a).await,
        ChatCommand::Invite(a) => {
            let req = Req::Invite(v1::InviteRequest {
                chat_id: a.chat,
                user_id: a.user,
            });
            ack_command(&a.conn, req, &format!("invited {}", a.user)).await
        }
        ChatCommand::Remove(a) => {
            let req = Req::RemoveMember(v1::RemoveMemberRequest {
                chat_id: a.chat,
                user_id: a.user,
            });
            ack_command(&a.conn, req, &format!("removed {}", a.user)).await
        }
        ChatCommand::Leave(a) => {
            let req = Req::LeaveChat(v1::LeaveChatRequest { chat_id: a.chat });
            ack_command(&a.conn, req, "left").await
        }
        ChatCommand::Ban(a) => {
            let req = Req::Ban(v1::BanRequest {
                chat_id: a.chat,
                user_id: a.user,
            });
            ack_command(&a.conn, req, &format!("banned {}", a.user)).await
        }
        ChatCommand::Unban(a) => {
            let req = Req::Unban(v1::UnbanRequest {
                chat_id: a.chat,
                user_id: a.user,
            });
            ack_command(&a.conn, req, &format!("unbanned {}", a.user)).await
        }
        ChatCommand::Join(a) => {
            let req = Req::JoinChat(v1::JoinChatRequest { chat_id: a.chat });
            ack_command(&a.conn, req, "joined").await
        }
        ChatCommand::Role(a) => {
            let role = match a.role {
                RoleArg::Member => v1::MemberRole::Member,
                RoleArg::Admin => v1::MemberRole::Admin,
            };
            let req = Req::SetRole(v1::SetRoleRequest {
                chat_id: a.chat,
                user_id: a.user,
                role: role.into(),
            });
            let done = format!("{} is now {}", a.user, role_name(role.into()));
            ack_command(&a.conn, req, &done).await
        }
    }
}

async fn chat_create(a: ChatCreateArgs) -> CmdResult {
    let (kind, title, members) = match a.kind {
        KindArg::Group | KindArg::Channel => {
            let Some(name) = a.name.filter(|n| !n.is_empty()) else {
                return Err(CmdError::new(
                    "BAD_REQUEST",
                    "a group or channel needs a NAME (its title)",
                ));
            };
            let kind = if a.kind == KindArg::Group {
                v1::ChatKind::Group
            } else {
                v1::ChatKind::Channel
            };
            (kind, name, a.members)
        }
        KindArg::Direct => {
            let members = if !a.members.is_empty() {
                a.members
            } else {
                match a.name.as_deref().map(str::parse::<u64>) {
                    Some(Ok(other)) => vec![other],
                    _ => {
                        return Err(CmdError::new(
                            "BAD_REQUEST",
                            "a direct chat needs the other user's id: --members ID (or NAME = ID)",
                        ));
                    }
                }
            };
            (v1::ChatKind::Direct, String::new(), members)
        }
    };
    let c = connect(&a.conn, true).await?;
    let r = c
        .create_chat(v1::CreateChatRequest {
            kind: kind.into(),
            title: title.clone(),
            member_ids: members,
        })
        .await?;
    let kind_name = chat_kind_name(kind.into());
    Printer::new(&a.conn).result(
        &json!({"chat_id": r.chat_id, "seq": r.seq, "kind": kind_name}),
        || {
            if title.is_empty() {
                format!("chat {} ({kind_name})", r.chat_id)
            } else {
                format!("chat {} ({kind_name} {title:?})", r.chat_id)
            }
        },
    );
    Ok(())
}

/// How many items to ask for in the next page: `left` capped by the page maximum.
fn page_len(left: Option<u32>) -> u32 {
    left.unwrap_or(PAGE_ITEMS_MAX).min(PAGE_ITEMS_MAX)
}

async fn chat_list(a: ChatListArgs) -> CmdResult {
    let c = connect(&a.conn, true).await?;
    let mut chats = Vec::new();
    let mut after = a.after;
    let mut left = a.limit;
    let has_more = loop {
        if left == Some(0) {
            break true;
        }
        let page = c
            .list_chats(v1::ListChatsRequest {
                after_chat_id: after,
                limit: page_len(left),
            })
            .await?;
        left = left.map(|l| l.saturating_sub(page.chats.len() as u32));
        let Some(last) = page.chats.last() else {
            break false;
        };
        after = last.chat_id;
        chats.extend(page.chats);
        if !page.has_more {
            break false;
        }
    };
    let list: Vec<Value> = chats
        .iter()
        .map(|s| {
            json!({"chat_id": s.chat_id, "kind": chat_kind_name(s.kind), "title": s.title,
                   "role": role_name(s.role), "head_seq": s.head_seq, "read_seq": s.read_seq,
                   "unread_count": s.unread_count, "member_count": s.member_count})
        })
        .collect();
    Printer::new(&a.conn).result(&json!({"chats": list, "has_more": has_more}), || {
        if chats.is_empty() {
            return "no chats".to_owned();
        }
        chats
            .iter()
            .map(|s| {
                format!(
                    "{}  {} {:?}  {}  {} members  head #{}  {} unread",
                    s.chat_id,
                    chat_kind_name(s.kind),
                    s.title,
                    role_name(s.role),
                    s.member_count,
                    s.head_seq,
                    s.unread_count
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

async fn chat_members(a: ChatMembersArgs) -> CmdResult {
    let c = connect(&a.conn, true).await?;
    let mut members = Vec::new();
    let mut after = a.after;
    let mut left = a.limit;
    let has_more = loop {
        if left == Some(0) {
            break true;
        }
        let page = c
            .list_members(v1::ListMembersRequest {
                chat_id: a.chat,
                after_user_id: after,
                limit: page_len(left),
            })
            .await?;
        left = left.map(|l| l.saturating_sub(page.members.len() as u32));
        let Some(last) = page.members.last() else {
            break false;
        };
        after = last.user_id;
        members.extend(page.members);
        if !page.has_more {
            break false;
        }
    };
    let list: Vec<Value> = members
        .iter()
        .map(|m| json!({"user_id": m.user_id, "role": role_name(m.role), "joined_seq": m.joined_seq}))
        .collect();
    Printer::new(&a.conn).result(&json!({"members": list, "has_more": has_more}), || {
        members
            .iter()
            .map(|m| {
                format!(
                    "{}  {}  (since #{})",
                    m.user_id,
                    role_name(m.role),
                    m.joined_seq
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// A random non-zero client message id.
fn random_client_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

async fn send(a: SendArgs) -> CmdResult {
    let c = connect(&a.conn, true).await?;
    let client_id = a.client_id.unwrap_or_else(random_client_id);
    let r = c
        .send_message(v1::SendMessageRequest {
            chat_id: a.chat,
            client_message_id: client_id,
            text: a.text,
            media: None,
            reply_to_seq: a.reply_to.unwrap_or(0),
        })
        .await?;
    Printer::new(&a.conn).result(
        &json!({"chat_id": r.chat_id, "seq": r.seq, "timestamp_ms": r.timestamp_ms,
                "client_id": client_id, "deduplicated": r.deduplicated}),
        || {
            let mut line = format!(
                "sent #{} to chat {} (client id {client_id})",
                r.seq, r.chat_id
            );
            if r.deduplicated {
                line.push_str(": already posted, nothing new");
            }
            line
        },
    );
    Ok(())
}

async fn history(a: HistoryArgs) -> CmdResult {
    let c = connect(&a.conn, true).await?;
    let backward = a.backward || a.from.is_none();
    let direction = if backward {
        v1::Direction::Backward
    } else {
        v1::Direction::Forward
    };
    let mut events: Vec<v1::Event> = Vec::new();
    let mut from = a.from.unwrap_or(0);
    let mut left = a.limit;
    let mut head_seq = 0;
    let has_more = loop {
        let page = c
            .history(v1::HistoryRequest {
                chat_id: a.chat,
                from_seq: from,
                direction: direction.into(),
                limit: page_len(Some(left)),
            })
            .await?;
        head_seq = head_seq.max(page.head_seq);
        left = left.saturating_sub(page.events.len() as u32);
        let (Some(first), Some(last)) = (page.events.first(), page.events.last()) else {
            break false;
        };
        if backward {
            from = first.seq.saturating_sub(1);
            let mut page_events = page.events;
            page_events.append(&mut events);
            events = page_events;
        } else {
            from = last.seq + 1;
            events.extend(page.events);
        }
        if !page.has_more || left == 0 || (backward && from == 0) {
            break page.has_more;
        }
    };
    let p = Printer::new(&a.conn);
    let list: Vec<Value> = events.iter().map(output::event_json).collect();
    p.result(
        &json!({"events": list, "head_seq": head_seq, "has_more": has_more}),
        || {
            if events.is_empty() {
                return format!("chat {}: no events here (head #{head_seq})", a.chat);
            }
            events
                .iter()
                .map(output::event_line)
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    Ok(())
}

/// How often `tail` pings while it only waits for pushes: well under the server's idle
/// timeout (60 s by default).
const TAIL_PING_INTERVAL: Duration = Duration::from_secs(20);
