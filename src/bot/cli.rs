//! `chatlog bot …`: create bots, list them, replace a bot's token, over the binary
//! protocol as the logged-in owner (`--token`, like every client command).
//!
//! What it owns: the flags, help and output of these commands. What it must not do:
//! anything the server decides (names, ownership).

use chatlog_wire::proto::v1;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cli::CliError;
use crate::client_cmd::output::Printer;
use crate::client_cmd::{CmdResult, Conn, connect};

/// `chatlog bot …`
#[derive(Debug, Subcommand)]
pub enum BotCommand {
    /// Create a bot you own; prints its user id and its bot API token.
    ///
    /// The token is shown once (the server keeps only a hash of it). Use it on the HTTP
    /// port: `curl http://HTTP_ADDR/bot<TOKEN>/getMe` (docs/bots.md). Add the bot to a
    /// chat with `chatlog chat invite CHAT BOT_ID`.
    ///
    /// --json: {"user_id": N, "name": "…", "token": "N:SECRET"}
    Create(BotCreateArgs),
    /// List your bots (those in groups the server you ask hosts).
    ///
    /// --json: {"bots": [{"user_id": N, "name": "…", "webhook_url": "…",
    /// "pending_update_count": N}, …]}
    List(BotListArgs),
    /// Replace one of your bots' tokens; the old one stops working at once.
    ///
    /// --json: {"user_id": N, "token": "N:SECRET"}
    Token(BotTokenArgs),
}

/// Flags of `bot create`.
#[derive(Debug, Args)]
pub struct BotCreateArgs {
    /// The bot's handle: unique among users, 1 to 32 bytes of a-z, 0-9 and _.
    name: String,
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `bot list`.
#[derive(Debug, Args)]
pub struct BotListArgs {
    #[command(flatten)]
    conn: Conn,
}

/// Flags of `bot token`.
#[derive(Debug, Args)]
pub struct BotTokenArgs {
    /// The bot's user id.
    bot_id: u64,
    #[command(flatten)]
    conn: Conn,
}

/// Runs one `bot` command on its own single-threaded runtime.
pub fn run(cmd: BotCommand) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(dispatch(cmd))
        .map_err(|e| Box::new(e) as CliError)
}

async fn dispatch(cmd: BotCommand) -> CmdResult {
    match cmd {
        BotCommand::Create(a) => {
            let c = connect(&a.conn, true).await?;
            let r = c
                .create_bot(v1::CreateBotRequest {
                    name: a.name.clone(),
                })
                .await?;
            Printer::new(&a.conn).result(
                &json!({"user_id": r.user_id, "name": a.name, "token": r.token}),
                || format!("bot {} ({}) created; token: {}", a.name, r.user_id, r.token),
            );
        }
        BotCommand::List(a) => {
            let c = connect(&a.conn, true).await?;
            let r = c.list_bots(v1::ListBotsRequest {}).await?;
            let bots: Vec<_> = r
                .bots
                .iter()
                .map(|b| {
                    json!({"user_id": b.user_id, "name": b.name, "webhook_url": b.webhook_url,
                           "pending_update_count": b.pending_update_count})
                })
                .collect();
            Printer::new(&a.conn).result(&json!({ "bots": bots }), || {
                if r.bots.is_empty() {
                    return "no bots".to_string();
                }
                r.bots
                    .iter()
                    .map(|b| {
                        let hook = if b.webhook_url.is_empty() {
                            "getUpdates".to_string()
                        } else {
                            format!("webhook {}", b.webhook_url)
                        };
                        format!(
                            "{} {} ({hook}, {} pending)",
                            b.user_id, b.name, b.pending_update_count
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        BotCommand::Token(a) => {
            let c = connect(&a.conn, true).await?;
            let r = c
                .reset_bot_token(v1::ResetBotTokenRequest { bot_id: a.bot_id })
                .await?;
            Printer::new(&a.conn).result(&json!({"user_id": r.user_id, "token": r.token}), || {
                format!("bot {} has a new token: {}", r.user_id, r.token)
            });
        }
    }
    Ok(())
}
